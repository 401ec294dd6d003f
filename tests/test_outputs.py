"""Output choices: Enhanced SR, a KOS of the key images, and a model artifact replaced under a running node;
results that validate whatever the input carries."""

import io
import shutil

import highdicom as hd
import pydicom
import pytest
import torch
from pydicom import DataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword

from plugin.models.architectures import DemoCNN
from plugin.models.artifact import read_manifest, save_artifact
from plugin.outputs import sr
from plugin.outputs.kos import key_images, key_object_selection
from plugin.outputs.sr import AlgorithmIdentity, measurement_report, read_measurement_report
from plugin.pipeline import FindingSpec
from plugin.postprocess import Finding
from tests.conftest import (
    DEMO_ARTIFACT,
    PYDICOM_FILES,
    dciodvfy_errors,
    results,
    storescu,
    wait_for,
    with_new_uids,
    write_pipeline,
)


def test_enhanced_sr_and_key_object_selection(start_node, tmp_path, demo_study, dcmtk):
    write_pipeline(tmp_path / "pipelines", outputs=[{"sr": {"sop_class": "enhanced"}}, {"kos": {"when": "positive"}}])
    node = start_node()
    positive, negative = demo_study["Demo chest CT, nodules"], demo_study["Demo chest CT, no nodules"]
    assert storescu(node.port, *positive, *negative).returncode == 0
    paths = wait_for(lambda: len(results(node.results_dir)) == 3 and results(node.results_dir), what="2 SRs + 1 KOS")
    objects = {str(pydicom.dcmread(p).SOPClassUID): [] for p in paths}
    for path in paths:
        objects[str(pydicom.dcmread(path).SOPClassUID)].append(path)
        assert dciodvfy_errors(path) == [], path
    assert len(objects[pydicom.uid.EnhancedSRStorage]) == 2
    [kos_path] = objects[pydicom.uid.KeyObjectSelectionDocumentStorage]  # only the positive series has one
    kos = pydicom.dcmread(kos_path)
    [key] = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert key.ReferencedSOPInstanceUID in {str(pydicom.dcmread(p).SOPInstanceUID) for p in positive}
    for path in objects[pydicom.uid.EnhancedSRStorage]:
        assert read_measurement_report(pydicom.dcmread(path))[0].algorithm_name == "lung-nodule-demo"


def test_replaced_artifact_is_used_by_the_next_job_and_a_broken_one_is_not(start_node, tmp_path, demo_study, dcmtk):
    artifact = tmp_path / "model"
    shutil.copytree(DEMO_ARTIFACT, artifact)
    write_pipeline(tmp_path / "pipelines", model={"artifact": str(artifact)})
    node = start_node()
    series = demo_study["Demo chest CT, nodules"][:3]

    def model_hash_of_next_sr(copy: str) -> str:
        before = set(results(node.results_dir))
        assert storescu(node.port, *with_new_uids(series, tmp_path / copy)).returncode == 0
        [new] = wait_for(lambda: [p for p in results(node.results_dir) if p not in before], what="the next SR")
        parameters = read_measurement_report(pydicom.dcmread(new))[0].algorithm_parameters
        return next(p.split("=", 1)[1] for p in parameters if p.startswith("model_sha256="))

    original = read_manifest(artifact)["files"]["weights.safetensors"]
    assert model_hash_of_next_sr("a") == original
    torch.manual_seed(1)
    save_artifact(artifact, DemoCNN(), {k: read_manifest(artifact)[k] for k in ("architecture", "input", "classes")})
    replaced = read_manifest(artifact)["files"]["weights.safetensors"]
    assert replaced != original and model_hash_of_next_sr("b") == replaced
    (artifact / "weights.safetensors").write_bytes(b"half-copied")  # a broken copy: the loaded model stays
    assert model_hash_of_next_sr("c") == replaced


ALGORITHM = AlgorithmIdentity("unit", "1", "a" * 64, "b" * 64, "fp32", "cpu")
NODULE = FindingSpec(label="nodule", code=("SCT", "27925004", "Nodule"), threshold=0.5)
MASS = FindingSpec(label="mass", code=("SCT", "4147007", "Mass"), threshold=0.5)


def _header(**values: object) -> pydicom.Dataset:
    """CT_small's header with ``values`` set as they are (None: removed), however invalid."""
    header = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    with pydicom.config.disable_value_validation():
        for keyword, value in values.items():
            if value is None:
                del header[keyword]
            else:
                tag = tag_for_keyword(keyword)
                header[tag] = DataElement(tag, dictionary_VR(tag), value)
    return header


def _results_errors(header: pydicom.Dataset, directory) -> dict[str, list[str]]:
    """dciodvfy's errors on the SR and the KOS built from ``header``."""
    findings = [Finding(NODULE, 0.9, True, 0)]
    errors = {}
    for kind, result in (
        ("sr", measurement_report([header], findings, ALGORITHM)),
        ("kos", key_object_selection([header], [header], ALGORITHM)),
    ):
        result.save_as(directory / f"{kind}.dcm", enforce_file_format=True)
        errors[kind] = dciodvfy_errors(directory / f"{kind}.dcm")
    return errors


def test_results_of_an_input_whose_identity_was_removed_without_a_method_validate(tmp_path, dcmtk, caplog):
    header = _header(PatientIdentityRemoved="YES")
    assert _results_errors(header, tmp_path) == {"sr": [], "kos": []}
    assert "PatientIdentityRemoved" not in pydicom.dcmread(tmp_path / "sr.dcm")
    assert header.PatientIdentityRemoved == "YES"  # the input's header is not changed
    [warning] = {r.getMessage() for r in caplog.records if r.name == "plugin.outputs.conformance"}
    assert "PatientIdentityRemoved" in warning and "YES" not in warning


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(**values: object) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


# Inputs that are not conformant in the attributes a result copies; each but the age
# (which radpipe repaired already) made the SR or the KOS fail dciodvfy, or highdicom
# raise, before radpipe conformed what highdicom copies.
NONCONFORMANT = {
    "type 2 attributes absent": dict.fromkeys(
        ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "StudyDate"),
    ),
    "invalid values": {
        "PatientSex": "X",
        "StudyDate": "2020-01-01",
        "StationName": "s" * 40,
        "PatientSize": "1.800000000000000001",
    },
    "unknown character set": {"SpecificCharacterSet": "ISO-8859-1"},
    "name with too many components": {"ReferringPhysicianName": "a^b^c^d^e^f"},
    "age string without zero padding (repaired)": {"PatientAge": "75Y"},
    "enumerated value": {"SmokingStatus": "MAYBE", "QualityControlSubject": "Y"},
    "animal without breed": {"PatientSpeciesDescription": "Canis lupus familiaris"},
    "strain without species": {"StrainDescription": "C57BL/6"},
    "alternative calendar without its name": {"PatientBirthDateInAlternativeCalendar": "5783"},
    "calendar name alone": {"PatientAlternativeCalendar": "HEBREW"},
    "responsible person without role": {"ResponsiblePerson": "Doe^Jane"},
    "clinical trial subject without sponsor": {"ClinicalTrialSubjectID": "17"},
    "clinical trial study without time point": {"ClinicalTrialTimePointDescription": "baseline"},
    "other patient ID without its type": {"OtherPatientIDsSequence": [_item(PatientID="X17")]},
    "code without a value": {"ProcedureCodeSequence": [_code("", "SCT", "CT of chest")]},
    "reference without its UIDs": {"ReferencedStudySequence": [pydicom.Dataset()]},
}


@pytest.mark.parametrize("values", NONCONFORMANT.values(), ids=NONCONFORMANT.keys())
def test_results_of_nonconformant_inputs_validate(tmp_path, dcmtk, values):
    assert _results_errors(_header(**values), tmp_path) == {"sr": [], "kos": []}


def test_results_keep_what_conforms_and_what_can_be_repaired(tmp_path, dcmtk):
    header = _header(
        PatientIdentityRemoved="YES",
        DeidentificationMethodCodeSequence=[_code("113100", "DCM", "Basic Application Confidentiality Profile")],
        PatientAge="75Y",
        SpecificCharacterSet="ISO-8859-1",
        PatientName="Müller^Jürgen",
    )
    assert _results_errors(header, tmp_path) == {"sr": [], "kos": []}
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    assert (sr.PatientIdentityRemoved, sr.PatientAge, sr.PatientID) == ("YES", "075Y", header.PatientID)
    assert (sr.SpecificCharacterSet, sr.PatientName) == ("ISO_IR 192", "Müller^Jürgen")


def test_key_images_of_multiframe_instances_are_the_instances_holding_the_key_frames():
    sources = [_header(), _header(NumberOfFrames=10), _header()]
    findings = [Finding(NODULE, 0.9, True, 5), Finding(NODULE, 0.8, True, 11), Finding(NODULE, 0.1, False, 0)]
    assert key_images(sources, findings, only_present=True) == sources[1:]
    assert key_images(sources, findings, only_present=False) == sources


@pytest.mark.parametrize("study_uid", ["999.999.2.19941105.112000", "1.2.840.0113654"], ids=["root", "leading-zero"])
def test_a_series_whose_uids_no_result_could_carry_fails_named(start_node, tmp_path, demo_study, dcmtk, study_uid):
    """A result names its sources by their UIDs and cannot change them: the job fails."""
    series = with_new_uids(demo_study["Demo chest CT, nodules"][:2], tmp_path / "series")
    for path in series:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(path, enforce_file_format=True)
    node = start_node()
    assert storescu(node.port, *series).returncode == 0
    [job] = wait_for(lambda: [j for j in node.journal.jobs() if j.status in ("done", "failed")], what="the job")
    assert job.status == "failed" and job.error.startswith("invalid_uid: ")
    assert results(node.results_dir) == []


def _encoded(document: pydicom.Dataset) -> bytes:
    """``document`` as written, with the times of its making (which differ from build to build) fixed."""
    document.ContentDate = document.InstanceCreationDate = "20240101"
    document.ContentTime = document.InstanceCreationTime = "090000"
    for item in document.ContributingEquipmentSequence:
        item.ContributionDateTime = "20240101090000"
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _highdicom_images(headers: list[pydicom.Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """What highdicom's own constructor makes for each source: what sr._source_images must equal."""
    return [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=h.SOPClassUID, referenced_sop_instance_uid=h.SOPInstanceUID
        )
        for h in headers
    ]


def test_each_copied_source_image_is_the_one_highdicom_makes(demo_study):
    """sr._source_images copies its first item for the other sources: each copy must equal
    highdicom's own item for its source, SOP Class included, and share no reference with
    the others; they share the first's concept name (see sr._source_images)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in demo_study["Demo chest CT, nodules"][:3]]
    headers[1].SOPClassUID = pydicom.uid.MRImageStorage  # a series may mix SOP classes
    made = sr._source_images(headers)
    expected = _highdicom_images(headers)
    assert [type(item) for item in made] == [type(item) for item in expected]
    assert made == expected
    assert len({id(item.ReferencedSOPSequence[0]) for item in made}) == len(made)
    assert len({id(item.ConceptNameCodeSequence[0]) for item in made}) == 1


@pytest.mark.parametrize("sop_class", ["comprehensive3d", "enhanced"])
def test_a_report_adds_its_source_images_as_highdicom_would(demo_study, tmp_path, dcmtk, sop_class):
    """measurement_report adds each group's source images once highdicom has built the
    document (sr._add_source_images, for speed) and copies all but the first image item
    (sr._source_images): it must write exactly what highdicom writes when its document
    constructor is given the groups with the images its own constructor makes, and the
    built object's content must show them too."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in demo_study["Demo chest CT, nodules"]]
    findings = [Finding(NODULE, 0.9, True, 3), Finding(MASS, 0.2, False, 0)]
    built = measurement_report(headers, findings, ALGORITHM, sop_class)
    uids = sr._report_uids(ALGORITHM, headers)
    groups = [sr._measurement_group(finding, ALGORITHM, uids[1]) for finding in findings]
    for group in groups:  # what highdicom's group constructor does with source_images
        group[0].ContentSequence.extend(_highdicom_images(headers))
    reference = sr._document(headers, [(group, ()) for group in groups], ALGORITHM, uids, sop_class, ())
    assert _encoded(built) == _encoded(reference)

    sources = tuple(str(h.SOPInstanceUID) for h in headers)
    [measurements] = [item for item in built.content[0].ContentSequence if item.name == sr.IMAGING_MEASUREMENTS]
    for group in measurements.ContentSequence:
        images = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        assert tuple(str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images) == sources
    built.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    read = read_measurement_report(pydicom.dcmread(tmp_path / "sr.dcm"))
    expected = [(spec.code[1], sources) for spec in (NODULE, MASS)]
    assert [(f.finding.value, f.source_sop_instance_uids) for f in read] == expected
