"""Output choices: Enhanced SR, a KOS of the key images, and a model artifact replaced under a running node."""

import shutil

import pydicom
import torch

from plugin.models.architectures import DemoCNN
from plugin.models.artifact import read_manifest, save_artifact
from plugin.outputs.sr import read_measurement_report
from tests.conftest import DEMO_ARTIFACT, dciodvfy_errors, results, storescu, wait_for, with_new_uids, write_pipeline


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
