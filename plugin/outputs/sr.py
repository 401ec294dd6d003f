"""The job's result as a TID 1500 Measurement Report in a Comprehensive 3D SR.

One TID 1501 measurement group per finding, holding: a Tracking Identifier and UID; the
Finding (DCM 121071) = the finding's code; TID 4019 Algorithm Identification (name =
pipeline name, version = pipeline version and model hash; parameters = model sha256,
precision, device, pipeline file hash); a qualitative evaluation Present (SCT 52101004)
or Absent (SCT 272519000); the probability (DCM 122157, UCUM "1"); and every source image.
Patient and study attributes are copied from the inputs by highdicom, from a conformed
copy of the first (:mod:`plugin.outputs.conformance`).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, generate_uid

from plugin import __version__
from plugin.outputs.conformance import conformant_source, referenceable
from plugin.postprocess import Finding

PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
NO_UNITS = Code("1", "UCUM", "no units")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
RESULT_SERIES_NUMBER = 9901


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


def _measurement_group(
    finding: Finding, algorithm: AlgorithmIdentity, sources: Sequence[Dataset], sop_uid: str
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
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=s.SOPClassUID, referenced_sop_instance_uid=s.SOPInstanceUID
            )
            for s in sources
        ],
    )


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
    if not sources:
        raise ValueError("sources: a result needs at least one source image")
    if not all(referenceable(s) for s in sources):
        raise ValueError("sources: a Study, Series or SOP Instance UID is not a valid UID")
    series_uid, sop_uid = result_uids(algorithm, sources, "sr")
    observation_context = hd.sr.ObservationContext(
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
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[_measurement_group(f, algorithm, sources, sop_uid) for f in findings],
    )
    document, sop_class_uid = (
        (hd.sr.EnhancedSR, EnhancedSRStorage)
        if sop_class == "enhanced"
        else (hd.sr.Comprehensive3DSR, Comprehensive3DSRStorage)
    )
    sr = document(
        evidence=[conformant_source(sources[0], sop_class_uid), *sources[1:]],
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
    return sr


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
