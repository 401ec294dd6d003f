"""Model artifacts are hash-checked before loading; a tampered one is refused, and the node keeps serving."""

import json
import shutil

import pytest
import torch

from plugin.models.artifact import ArtifactError, load_artifact
from tests.conftest import DEMO_ARTIFACT, storescu, wait_for, write_pipeline


def test_demo_artifact_loads_and_classifies():
    artifact = load_artifact(DEMO_ARTIFACT, torch.device("cpu"))
    assert artifact.classes == ["normal", "nodule"]
    assert artifact.module(torch.zeros(2, 1, 128, 128)).shape == (2, 2)
    assert len(artifact.sha256) == 64


def test_tampered_weights_are_refused(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(DEMO_ARTIFACT, copy)
    with (copy / "weights.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_artifact(copy, torch.device("cpu"))


def test_manifest_naming_an_unknown_architecture_is_refused(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(DEMO_ARTIFACT, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["architecture"]["id"] = "os.system"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unknown architecture"):
        load_artifact(copy, torch.device("cpu"))


def test_node_with_tampered_model_fails_the_job_and_keeps_serving(start_node, tmp_path, demo_study, dcmtk):
    copy = tmp_path / "model"
    shutil.copytree(DEMO_ARTIFACT, copy)
    write_pipeline(tmp_path / "pipelines", model={"artifact": str(copy), "device": "auto", "batch_size": 8})
    (copy / "weights.safetensors").write_bytes((copy / "weights.safetensors").read_bytes()[:-1] + b"\1")
    node = start_node()
    assert storescu(node.port, *demo_study["Demo chest CT, nodules"][:3]).returncode == 0
    job = wait_for(lambda: node.journal.jobs() and node.journal.jobs()[0].status == "failed" and node.journal.jobs()[0])
    assert "refusing to load a modified artifact" in job.error
    assert (
        node.metrics.registry.get_sample_value(
            "radpipe_jobs_total", {"pipeline": "lung-nodule-demo", "status": "failed"}
        )
        == 1
    )
    assert storescu(node.port, *demo_study["Demo chest CT, nodules"][3:5]).returncode == 0
