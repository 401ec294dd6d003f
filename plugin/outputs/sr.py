"""The job's result as a TID 1500 Measurement Report in a Comprehensive 3D SR.

Classification (:func:`measurement_report`): one TID 1501 measurement group per
finding, holding: a Tracking Identifier and UID; the Finding (DCM 121071) = the finding's
code; TID 4019 Algorithm Identification (name = pipeline name, version = pipeline version
and model hash; parameters = model sha256, precision, device, pipeline file hash); a
qualitative evaluation Present (SCT 52101004) or Absent (SCT 272519000); the probability
(DCM 122157, UCUM "1"); and every source image. Patient and study attributes are copied
from the inputs by highdicom, from a conformed copy of the first
(:mod:`plugin.outputs.conformance`).

Segmentation (:func:`volumetric_measurement_report`): per lesion, a TID 1411 Volumetric
ROI group with its Tracking Identifier ("nodule 1") and UID, the Finding and its
category, TID 4019, Present, and TID 1419 measurements: Volume (SCT 118565006, mm3), Long
Axis (SCT 103339001, mm: the longest axial diameter), and Probability (DCM 122157) with
derivation Mean and Maximum; its region is the Referenced Segment: its segment in the
job's SEG, with the source images the lesion lies on, so a viewer jumps from the numbers
to the outline.
TID 1411 holds exactly one region reference, and highdicom refuses coordinates on its
measurements, so the centroid is a second TID 1411 group of the same lesion (same
tracking UID) whose region is a Volume Surface SCOORD3D POINT with Geometric purpose of
region = Geometric Centerpoint (DCM 128137). Each segment without a lesion gets a TID
1501 group as a negative classification does: Absent, with the segment's highest voxel
probability.
"""

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, generate_uid

from plugin import __version__
from plugin.outputs.conformance import conformant_source, referenceable
from plugin.pipeline import SegmentSpec
from plugin.postprocess import Finding
from plugin.segment import Lesion, Segmentation

PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
NO_UNITS = Code("1", "UCUM", "no units")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
VOLUME = Code("118565006", "SCT", "Volume")
# CID 7470 Linear Measurements: "the longest dimension of a lesion on an image", i.e. in its
# plane: the longest axial diameter, as RECIST and Lung-RADS measure it.
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
MEAN = Code("373098007", "SCT", "Mean")  # CID 7464 ROI measurement modifiers
MAXIMUM = Code("56851009", "SCT", "Maximum")
# CID 219: the point is the voxels' mean position (unweighted), not an intensity-weighted
# Center of Mass (DCM 128138).
GEOMETRIC_CENTERPOINT = Code("128137", "DCM", "Geometric Centerpoint")
REFERENCED_SEGMENT = Code("121191", "DCM", "Referenced Segment")
VOLUME_SURFACE = Code("121231", "DCM", "Volume Surface")
CUBIC_MILLIMETER = Code("mm3", "UCUM", "cubic millimeter")
MILLIMETER = Code("mm", "UCUM", "millimeter")
RESULT_SERIES_NUMBER = 9901
_SOP_CLASS, _SOP_INSTANCE = 0x00081150, 0x00081155  # Referenced SOP Class and Instance UID
_CONCEPT_NAME = 0x0040A043  # Concept Name Code Sequence

IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")

_Group = hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
# A group and the TID 1501 source images it references, added once the document is built (_add_source_images).
_Sourced = tuple[_Group, Sequence[hd.sr.SourceImageForMeasurementGroup]]


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Everything that decides a result: which pipeline version ran which model, how."""

    pipeline: str
    pipeline_version: str
    pipeline_sha256: str
    model_sha256: str
    precision: str
    device: str

    @property
    def version(self) -> str:
        return f"{self.pipeline_version} (model {self.model_sha256[:16]})"

    @property
    def parameters(self) -> list[str]:
        return [
            f"model_sha256={self.model_sha256}",
            f"precision={self.precision}",
            f"device={self.device}",
            f"pipeline_sha256={self.pipeline_sha256}",
        ]


def result_uids(algorithm: AlgorithmIdentity, sources: Sequence[Dataset], kind: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of a result of ``kind`` (sr, kos), derived only
    from the inputs and the pipeline name/version (invariant 3): a re-run after a crash
    makes the same object, so a re-send is harmless."""
    first = sources[0]
    basis = [
        kind,
        algorithm.pipeline,
        algorithm.pipeline_version,
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        *sorted(str(s.SOPInstanceUID) for s in sources),
    ]
    return generate_uid(entropy_srcs=[*basis, "series"]), generate_uid(entropy_srcs=[*basis, "instance"])


def _code(triple: tuple[str, str, str]) -> Code:
    """A pipeline's ``[scheme, value, meaning]`` as a code."""
    scheme, value, meaning = triple
    return Code(value, scheme, meaning)


def _measurement_group(
    finding: Finding, algorithm: AlgorithmIdentity, sop_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    scheme, value, meaning = finding.spec.code
    finding_code = Code(value, scheme, meaning)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.pipeline, version=algorithm.version, parameters=algorithm.parameters
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_uid, finding.spec.label]), identifier=finding.spec.label
        ),
        finding_type=finding_code,
        algorithm_id=algorithm_id,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=finding_code, value=PRESENT if finding.present else ABSENT)
        ],
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY, value=round(finding.probability, 6), unit=NO_UNITS, algorithm_id=algorithm_id
            )
        ],
    )


def _source_images(sources: Sequence[Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """One TID 1501 Source IMAGE item per source, built once per report and shared by
    every group that references the whole series (:func:`_document` adds them).

    highdicom's constructor makes the first; the others are copies of it (pickle's, in
    C) with their own SOP Class and Instance UIDs. Every item but the UIDs is the same,
    and the constructor would build and check the concept name and relationship again
    for every image (issue 15: at most 0.2 ms per referenced image for the whole
    report). Two more savings of the same size:
    - the UIDs go in as the values pydicom checked when it read each source: an
      attribute assignment would check them again;
    - the copies share the first's Concept Name: highdicom's Content Sequence indexes
      its items by name, and finds one name object at once, where comparing two equal
      codes takes longer than the copy.
    ``tests/test_outputs.py`` checks that the report is byte for byte what highdicom
    writes with its constructor's items."""
    first = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=sources[0].SOPClassUID, referenced_sop_instance_uid=sources[0].SOPInstanceUID
    )
    template = pickle.dumps(first)
    images = [first]
    for source in sources[1:]:
        image = pickle.loads(template)
        image[_CONCEPT_NAME] = first[_CONCEPT_NAME]
        reference = image.ReferencedSOPSequence[0]
        reference[_SOP_CLASS] = DataElement(_SOP_CLASS, "UI", source.SOPClassUID, already_converted=True)
        reference[_SOP_INSTANCE] = DataElement(_SOP_INSTANCE, "UI", source.SOPInstanceUID, already_converted=True)
        images.append(image)
    return images


def _report_uids(algorithm: AlgorithmIdentity, sources: Sequence[Dataset]) -> tuple[str, str]:
    """The SR's (SeriesInstanceUID, SOPInstanceUID), once ``sources`` are checked."""
    if not sources:
        raise ValueError("sources: a result needs at least one source image")
    if not referenceable(*sources):
        raise ValueError("sources: a Study, Series or SOP Instance UID is not a valid UID")
    return result_uids(algorithm, sources, "sr")


def _observation_context(algorithm: AlgorithmIdentity) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=["radpipe", algorithm.pipeline]),
                name="radpipe",
                model_name=algorithm.pipeline,
                manufacturer_name="radpipe",
            ),
        )
    )


def _add_source_images(document: hd.sr.Comprehensive3DSR | hd.sr.EnhancedSR, groups: Sequence[_Sourced]) -> None:
    """Add each group's source images where highdicom's group constructor puts them (at
    the group's end), once the document is built, to the content tree that the data set
    encodes (the groups as built); ``document.content``, highdicom's copy of that tree,
    gets the same Content Sequence of each such group.

    Not through the group constructor, because highdicom's document constructor
    deep-copies the content tree it is given, parses the copy into its classes again and
    searches it for referenced images, item by item: 1-2 ms per source image of a
    500-slice series, against the 0.2 ms the whole build may take (issue 15). The items
    added are highdicom's own, built once and appended by highdicom's Content Sequence
    (which checks them); the search checks that every referenced image is evidence, and
    every source is (``evidence``). The document encodes to the same bytes as when the
    constructor is given the groups with their images."""
    [measurements] = [item for item in document.content[0].ContentSequence if item.name == IMAGING_MEASUREMENTS]
    for (group, images), copy in zip(groups, measurements.ContentSequence, strict=True):
        if images:
            for image in images:  # highdicom's extend indexes each item twice, its append once
                group[0].ContentSequence.append(image)
            element = group[0]["ContentSequence"]
            copy[element.tag] = element  # as it is: setting the attribute would check each item again


def _document(
    sources: Sequence[Dataset],
    groups: Sequence[_Sourced],
    algorithm: AlgorithmIdentity,
    uids: tuple[str, str],
    sop_class: str,
    predecessors: Sequence[Dataset],
    evidence: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR | hd.sr.EnhancedSR:
    """The TID 1500 document holding ``groups``, with the (SeriesInstanceUID,
    SOPInstanceUID) ``uids``; ``evidence``: what the groups reference besides ``sources``."""
    series_uid, sop_uid = uids
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[group for group, _ in groups],
    )
    document, sop_class_uid = (
        (hd.sr.EnhancedSR, EnhancedSRStorage)
        if sop_class == "enhanced"
        else (hd.sr.Comprehensive3DSR, Comprehensive3DSRStorage)
    )
    built = document(
        evidence=[conformant_source(sources[0], sop_class_uid), *sources[1:], *evidence],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=RESULT_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="radpipe",
        is_complete=True,
        previous_versions=list(predecessors) or None,
        software_versions=f"radpipe {__version__}",
        series_description=f"radpipe {algorithm.pipeline} v{algorithm.pipeline_version} (algorithm result)"[:64],
    )
    _add_source_images(built, groups)
    return built


def measurement_report(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    sop_class: str = "comprehensive3d",
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR | hd.sr.EnhancedSR:
    """Build the SR for one job. ``sources`` are the input headers (pixels not needed).
    ``sop_class`` "enhanced" writes the same content as Enhanced SR, for PACS that do not
    accept Comprehensive 3D SR (the content has no 3D coordinates, so both are valid).
    ``predecessors``: earlier SRs this one supersedes (Predecessor Documents Sequence)."""
    uids = _report_uids(algorithm, sources)
    images = _source_images(sources)
    groups = [(_measurement_group(f, algorithm, uids[1]), images) for f in findings]
    return _document(sources, groups, algorithm, uids, sop_class, predecessors)


def _lesion_groups(
    lesion: Lesion,
    spec: SegmentSpec,
    sources: Sequence[Dataset],
    seg: Dataset,
    algorithm_id: hd.sr.AlgorithmIdentification,
    sop_uid: str,
    with_centre: bool,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The lesion's TID 1411 group on its segment of the SEG and the source images it lies
    on and, ``with_centre``, a second one on its centroid (same tracking identifier and UID)."""
    finding = _code(spec.code)
    tracking = hd.sr.TrackingIdentifier(
        uid=generate_uid(entropy_srcs=[sop_uid, spec.label, str(lesion.number)]),
        identifier=f"{spec.label} {lesion.number}",
    )
    on_slices = [sources[i] for i in lesion.slices]
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=round(lesion.volume_mm3, 3), unit=CUBIC_MILLIMETER),
        hd.sr.Measurement(name=LONG_AXIS, value=round(lesion.diameter_mm, 3), unit=MILLIMETER),
        hd.sr.Measurement(name=PROBABILITY, value=round(lesion.mean_probability, 6), unit=NO_UNITS, derivation=MEAN),
        hd.sr.Measurement(name=PROBABILITY, value=round(lesion.max_probability, 6), unit=NO_UNITS, derivation=MAXIMUM),
    ]
    group = partial(
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
        tracking_identifier=tracking,
        finding_type=finding,
        finding_category=_code(spec.category),
        algorithm_id=algorithm_id,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=PRESENT)],
    )
    on_images = [hd.sr.SourceImageForSegmentation(s.SOPClassUID, s.SOPInstanceUID) for s in on_slices]
    # The segment by number, not the lesion's frames: PS3.3 lets an IMAGE item name frames
    # or segments, never both, and frames alone would hide the segment from a reader.
    groups = [
        group(
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=lesion.segment_number,
                source_images=on_images,
            ),
            measurements=measurements,
        )
    ]
    if with_centre:
        groups.append(
            group(
                referenced_volume_surface=hd.sr.VolumeSurface(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=np.array([lesion.centroid], dtype=float),
                    frame_of_reference_uid=sources[0].FrameOfReferenceUID,
                    source_images=on_images,
                ),
                geometric_purpose=GEOMETRIC_CENTERPOINT,
            )
        )
    return groups


def _absent_group(
    spec: SegmentSpec,
    probabilities: np.ndarray,
    algorithm_id: hd.sr.AlgorithmIdentification,
    sop_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for a segment without a lesion: Absent, with its highest voxel probability."""
    finding = _code(spec.code)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_uid, spec.label]), identifier=spec.label
        ),
        finding_type=finding,
        finding_category=_code(spec.category),
        algorithm_id=algorithm_id,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=ABSENT)],
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY,
                value=round(float(probabilities.max()) / 255, 6),
                unit=NO_UNITS,
                derivation=MAXIMUM,
            )
        ],
    )


def volumetric_measurement_report(
    sources: Sequence[Dataset],
    segmentation: Segmentation,
    seg: Dataset,
    algorithm: AlgorithmIdentity,
    sop_class: str = "comprehensive3d",
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR | hd.sr.EnhancedSR:
    """The SR of a segmentation job: per lesion, TID 1411 groups referencing its segment
    in ``seg`` (the job's SEG, as written) and its centroid; per segment without a lesion,
    a TID 1501 group saying Absent. ``sources`` in the order of the masks' depth axis.
    ``sop_class`` "enhanced" leaves the centroid groups out: Enhanced SR has no SCOORD3D,
    and a destination that takes only Enhanced SR still gets every lesion's measurements
    and segment."""
    uids = _report_uids(algorithm, sources)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.pipeline, version=algorithm.version, parameters=algorithm.parameters
    )
    groups: list[_Sourced] = []
    for lesion in segmentation.lesions:
        spec = segmentation.segments[lesion.segment_number - 1]
        lesion_groups = _lesion_groups(lesion, spec, sources, seg, algorithm_id, uids[1], sop_class != "enhanced")
        groups += [(group, ()) for group in lesion_groups]  # their images are in their region's reference
    with_lesion = {lesion.segment_number for lesion in segmentation.lesions}
    absent = [(n, spec) for n, spec in enumerate(segmentation.segments, start=1) if n not in with_lesion]
    images = _source_images(sources) if absent else []
    for number, spec in absent:
        group = _absent_group(spec, segmentation.probabilities[number - 1], algorithm_id, uids[1])
        groups.append((group, images))
    return _document(sources, groups, algorithm, uids, sop_class, predecessors, evidence=[seg])


@dataclass(frozen=True)
class ReportedFinding:
    """One measurement group read back from a result SR."""

    finding: Code
    present: bool
    probability: float
    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: tuple[str, ...]
    source_sop_instance_uids: tuple[str, ...]


_ALGORITHM_NAME, _ALGORITHM_VERSION, _ALGORITHM_PARAMETERS = "111001", "111003", "111002"


def read_measurement_report(dataset: Dataset) -> list[ReportedFinding]:
    """The findings of an SR written by :func:`measurement_report` (the round trip's reader)."""
    document = hd.sr.EnhancedSR if dataset.SOPClassUID == EnhancedSRStorage else hd.sr.Comprehensive3DSR
    sr = document.from_dataset(dataset)
    findings = []
    for group in sr.content.get_image_measurement_groups():
        texts: dict[str, list[str]] = {}
        for item in group[0].ContentSequence:
            if item.ValueType == "TEXT":
                texts.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(str(item.TextValue))
        finding_type = group.finding_type
        evaluation = group.get_qualitative_evaluations(name=finding_type)[0].value
        probability = group.get_measurements(name=PROBABILITY)[0].value
        findings.append(
            ReportedFinding(
                finding=Code(finding_type.value, finding_type.scheme_designator, finding_type.meaning),
                present=evaluation == PRESENT,
                probability=float(probability),
                algorithm_name=texts[_ALGORITHM_NAME][0],
                algorithm_version=texts[_ALGORITHM_VERSION][0],
                algorithm_parameters=tuple(texts.get(_ALGORITHM_PARAMETERS, [])),
                source_sop_instance_uids=tuple(s.referenced_sop_instance_uid for s in group.source_images),
            )
        )
    return findings


@dataclass(frozen=True)
class ReportedLesion:
    """One lesion read back from a volumetric report: its TID 1411 group(s)."""

    identifier: str
    tracking_uid: str
    finding: Code
    volume_mm3: float
    diameter_mm: float
    mean_probability: float
    max_probability: float
    segmentation_sop_instance_uid: str
    segment_number: int
    source_sop_instance_uids: tuple[str, ...]  # the images the lesion lies on
    centroid: tuple[float, float, float] | None  # None in Enhanced SR


def read_volumetric_measurement_report(dataset: Dataset) -> list[ReportedLesion]:
    """The lesions of an SR written by :func:`volumetric_measurement_report`; its Absent
    groups are what :func:`read_measurement_report` reads."""
    document = hd.sr.EnhancedSR if dataset.SOPClassUID == EnhancedSRStorage else hd.sr.Comprehensive3DSR
    content = document.from_dataset(dataset).content
    centroids: dict[str, tuple[float, float, float]] = {}
    for group in content.get_volumetric_roi_measurement_groups(reference_type=VOLUME_SURFACE):
        x, y, z = (float(c) for c in np.asarray(group.roi.graphic_data[0]).reshape(3))  # a POINT: one (x, y, z)
        centroids[str(group.tracking_uid)] = (x, y, z)
    lesions = []
    for group in content.get_volumetric_roi_measurement_groups(reference_type=REFERENCED_SEGMENT):
        segment = group.referenced_segment
        finding = group.finding_type
        probability = {
            str(m.derivation.value): float(m.value) for m in group.get_measurements(name=PROBABILITY) if m.derivation
        }
        lesions.append(
            ReportedLesion(
                identifier=str(group.tracking_identifier),
                tracking_uid=str(group.tracking_uid),
                finding=Code(finding.value, finding.scheme_designator, finding.meaning),
                volume_mm3=float(group.get_measurements(name=VOLUME)[0].value),
                diameter_mm=float(group.get_measurements(name=LONG_AXIS)[0].value),
                mean_probability=probability[MEAN.value],
                max_probability=probability[MAXIMUM.value],
                segmentation_sop_instance_uid=str(segment.referenced_sop_instance_uid),
                segment_number=int(segment.referenced_segment_numbers[0]),
                source_sop_instance_uids=tuple(
                    str(i.referenced_sop_instance_uid) for i in segment.source_images_for_segmentation
                ),
                centroid=centroids.get(str(group.tracking_uid)),
            )
        )
    return lesions
