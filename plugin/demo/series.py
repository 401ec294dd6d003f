"""Write phantom volumes as valid CT Image Storage series (tests, ``radpipe demo``).

Pixels are stored as signed 16-bit Hounsfield units (RescaleSlope 1, RescaleIntercept 0),
so what a reader gets after the modality LUT is exactly what the phantom drew. Headers
carry every Type 1 and Type 2 attribute of the CT Image IOD so that the files pass
``dciodvfy`` and are accepted by a PACS. With a ``seed``, UIDs and dates are derived from
it, so the same call writes byte-identical files.
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from plugin import __version__
from plugin.demo.phantom import PIXEL_SPACING_MM, SIZE, PhantomVolume, render_volume
from plugin.volume import Grid

SLICE_THICKNESS_MM = 2.5
POSITIVE_DESCRIPTION = "Demo chest CT, nodules"
NEGATIVE_DESCRIPTION = "Demo chest CT, no nodules"
_FIXED_DATETIME = datetime(2024, 1, 1, 9, 0, 0)  # seeded series: reproducible headers


def _uid(seed: int | None, *parts: object) -> str:
    return generate_uid(entropy_srcs=["radpipe-demo", str(seed), *map(str, parts)] if seed is not None else None)


def write_ct_series(
    out_dir: Path,
    volume: np.ndarray,
    *,
    study_uid: str,
    series_number: int,
    series_description: str,
    patient_name: str = "Demo^Patient",
    patient_id: str = "RADPIPE-DEMO",
    accession: str = "",
    seed: int | None = None,
) -> list[Path]:
    """Write ``volume`` ([n, rows, cols] int16 HU, first slice most cranial) one file per slice.

    Returns the paths in instance-number order.
    """
    if volume.ndim != 3 or volume.dtype != np.int16:
        raise ValueError(f"volume must be int16 [n, rows, cols], got {volume.dtype} {volume.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    when = _FIXED_DATETIME if seed is not None else datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    series_uid = _uid(seed, study_uid, series_number, "series")
    frame_of_reference_uid = _uid(seed, study_uid, series_number, "frame-of-reference")
    n, rows, cols = volume.shape
    # Centre the slab on the table origin; z decreases towards the feet (LPS: +z is head).
    origin_x = -(cols - 1) / 2 * PIXEL_SPACING_MM
    origin_y = -(rows - 1) / 2 * PIXEL_SPACING_MM
    paths = []
    for index, pixels in enumerate(volume):
        instance = index + 1
        z = ((n - 1) / 2 - index) * SLICE_THICKNESS_MM
        sop_uid = UID(_uid(seed, series_uid, instance))

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"RADPIPE_{__version__}"[:16]

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "radpipe"
        ds.InstitutionName = "radpipe synthetic data"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Demo chest CT (synthetic)"
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = "radpipe phantom"
        ds.SoftwareVersions = __version__
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{SLICE_THICKNESS_MM:g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [f"{origin_x:g}", f"{origin_y:g}", f"{z:g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [f"{PIXEL_SPACING_MM:g}", f"{PIXEL_SPACING_MM:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.WindowCenterWidthExplanation = "LUNG"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()

        path = out_dir / f"{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def series_geometry(n_slices: int, rows: int = SIZE, columns: int = SIZE) -> Grid:
    """The voxel grid of ``n_slices`` slices as :func:`write_ct_series` places them, in
    instance order (index 0: the first, most cranial slice). Phantom mm ``(x, y, z)`` with
    slices ``SLICE_THICKNESS_MM`` apart are index ``(z / thickness, y / spacing + (rows - 1) / 2,
    x / spacing + (columns - 1) / 2)`` on it."""
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, -SLICE_THICKNESS_MM)
    affine[:3, 1] = (0.0, PIXEL_SPACING_MM, 0.0)
    affine[:3, 2] = (PIXEL_SPACING_MM, 0.0, 0.0)
    affine[:3, 3] = (
        -(columns - 1) / 2 * PIXEL_SPACING_MM,
        -(rows - 1) / 2 * PIXEL_SPACING_MM,
        (n_slices - 1) / 2 * SLICE_THICKNESS_MM,
    )
    return Grid((n_slices, rows, columns), affine)


@dataclass(frozen=True)
class TruthNodule:
    """A nodule as the phantom drew it into a written series: what a segmenter should measure."""

    centroid: tuple[float, float, float]  # of its drawn voxels, patient coordinates (LPS) in mm
    diameter_mm: float  # of the sphere
    volume_mm3: float  # its drawn voxels times the voxel volume


@dataclass(frozen=True)
class SyntheticSeries:
    """A written phantom series: ``paths[i]`` holds ``volume.hu[i]`` and ``volume.mask[i]``."""

    description: str
    paths: list[Path]
    volume: PhantomVolume

    def nodules(self) -> list[TruthNodule]:
        """The truth of each of ``volume.nodules``, in patient coordinates."""
        grid = series_geometry(*self.volume.hu.shape)
        voxel_mm3 = float(np.prod(grid.spacing))
        truth = []
        for index, (*_, radius, _hu) in enumerate(self.volume.nodules):
            voxels = np.argwhere(self.volume.mask == index + 1)
            x, y, z = (float(c) for c in grid.to_patient(voxels.mean(axis=0, keepdims=True))[0])
            truth.append(TruthNodule((x, y, z), 2 * float(radius), len(voxels) * voxel_mm3))
        return truth


def synthetic_study_volumes(seed: int = 0, n_slices: int = 24) -> dict[str, PhantomVolume]:
    """The volumes of :func:`write_synthetic_study`'s two series, by description, drawn
    without writing them: 1-3 nodules, and a hard negative with vessels seen end-on."""
    rng = np.random.default_rng(seed)
    return {
        POSITIVE_DESCRIPTION: render_volume(rng, n_slices, int(rng.integers(1, 4)), SLICE_THICKNESS_MM),
        NEGATIVE_DESCRIPTION: render_volume(rng, n_slices, 0, SLICE_THICKNESS_MM),
    }


def write_synthetic_study(out_dir: Path, seed: int = 0, n_slices: int = 24) -> list[SyntheticSeries]:
    """One study, two series (:func:`synthetic_study_volumes`); series land in
    ``out_dir/<series number>/``."""
    study_uid = _uid(seed, "study")
    volumes = synthetic_study_volumes(seed, n_slices)
    return [
        SyntheticSeries(
            description,
            write_ct_series(
                out_dir / str(number),
                volume.hu,
                study_uid=study_uid,
                series_number=number,
                series_description=description,
                accession=f"DEMO{seed:06d}"[:16],
                seed=seed,
            ),
            volume,
        )
        for number, (description, volume) in enumerate(volumes.items(), start=1)
    ]


def synthetic_study(out_dir: Path, seed: int = 0, n_slices: int = 24) -> dict[str, list[Path]]:
    """:func:`write_synthetic_study`'s files, ``{series_description: paths}``."""
    return {series.description: series.paths for series in write_synthetic_study(out_dir, seed, n_slices)}
