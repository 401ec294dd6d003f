"""The job's segmentation as a DICOM Segmentation (highdicom): one segment per label.

Each segment is described by its pipeline spec (label, Segmented Property Category and
Type, algorithm type AUTOMATIC with the pipeline as the algorithm), whether or not it
holds a voxel: a reader learns that the model looked for it. Frames with no voxel of a
segment are left out (PS3.3 C.8.20.2 lets a frame exist only where its segment does);
when no segment holds a voxel every frame is written instead, as a Segmentation needs
at least one frame.

Transfer syntax (lossless, so the masks decode exactly): BINARY in JPEG 2000 Lossless,
the only compressed syntax highdicom 0.28 encodes for 1-bit frames; FRACTIONAL in JPEG-LS
Lossless, the smallest and fastest of the three it encodes for 8-bit frames (RLE, JPEG-LS,
JPEG 2000) on probability maps, which are mostly zero: for two nodules in 20 slices of
512x512, JPEG-LS 14 kB, JPEG 2000 19 kB, RLE 55 kB, native 2.6 MB (BINARY: JPEG 2000
15 kB, native 1-bit 340 kB).
"""

from collections.abc import Sequence
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, SegmentationStorage

from plugin import __version__
from plugin.outputs.conformance import conformant_source, referenceable
from plugin.outputs.sr import AlgorithmIdentity, result_uids
from plugin.segment import Segmentation

RESULT_SERIES_NUMBER = 9903
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162 Algorithm Family
MAX_FRACTIONAL_VALUE = 255  # Segmentation.probabilities holds round(p * 255)


def segment_descriptions(segmentation: Segmentation, algorithm: AlgorithmIdentity) -> list[hd.seg.SegmentDescription]:
    """One description per segment spec, numbered from 1 in the pipeline's order."""
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.pipeline, family=ARTIFICIAL_INTELLIGENCE, version=algorithm.version
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=Code(spec.category[1], spec.category[0], spec.category[2]),
            segmented_property_type=Code(spec.code[1], spec.code[0], spec.code[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for number, spec in enumerate(segmentation.segments, start=1)
    ]


def segmentation_object(
    sources: Sequence[Dataset],
    segmentation: Segmentation,
    algorithm: AlgorithmIdentity,
    kind: Literal["binary", "fractional"] = "binary",
) -> hd.seg.Segmentation:
    """The SEG of one job. ``sources`` are the single-frame source headers (pixels not
    needed) in the order of the masks' depth axis; every one is referenced. BINARY
    encodes ``segmentation.masks``; FRACTIONAL encodes ``segmentation.probabilities`` as
    PROBABILITY with maximum 255, values exactly as given."""
    if not sources:
        raise ValueError("sources: a segmentation needs at least one source image")
    if not all(referenceable(s) for s in sources):
        raise ValueError("sources: a Study, Series or SOP Instance UID is not a valid UID")
    segments, depth = len(segmentation.segments), len(sources)
    if segmentation.masks.shape[:2] != (segments, depth) or segmentation.probabilities.shape[:2] != (segments, depth):
        raise ValueError(
            f"segmentation: masks {segmentation.masks.shape} and probabilities {segmentation.probabilities.shape} "
            f"must be [{segments} segments, {depth} source images, rows, columns]"
        )
    if kind == "binary":
        voxels: np.ndarray = segmentation.masks.astype(bool, copy=False)
    else:  # highdicom takes probabilities as floats in [0, 1]; round(float32(p / 255) * 255) == p for every p
        voxels = segmentation.probabilities.astype(np.float32) / np.float32(MAX_FRACTIONAL_VALUE)
    series_uid, sop_uid = result_uids(algorithm, sources, "seg")
    return hd.seg.Segmentation(
        source_images=[conformant_source(sources[0], SegmentationStorage), *sources[1:]],
        pixel_array=np.moveaxis(voxels, 0, -1),  # highdicom's stacked segments: [frames, rows, columns, segments]
        segmentation_type=hd.seg.SegmentationTypeValues(kind.upper()),
        segment_descriptions=segment_descriptions(segmentation, algorithm),
        series_instance_uid=series_uid,
        series_number=RESULT_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="radpipe",
        manufacturer_model_name=algorithm.pipeline[:64],
        software_versions=f"radpipe {__version__}",
        device_serial_number="0",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_description=f"{algorithm.pipeline} v{algorithm.pipeline_version}"[:64],
        content_label="RADPIPE",
        transfer_syntax_uid=JPEG2000Lossless if kind == "binary" else JPEGLSLossless,
        omit_empty_frames=bool(voxels.any()),
        series_description=f"radpipe {algorithm.pipeline} v{algorithm.pipeline_version} (algorithm result)"[:64],
    )
