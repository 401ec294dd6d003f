"""Every YAML example in pipelines/README.md is a valid pipeline (docs cannot rot)."""

import re
from pathlib import Path

import pytest
import yaml
from torch import nn

from plugin.models.architectures import DemoCNN
from plugin.models.artifact import save_artifact
from plugin.pipeline import load_pipeline_files
from tests.conftest import REPO

DOC = REPO / "pipelines" / "README.md"
EXAMPLES = [block for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S) if "name:" in block]


def _artifact(directory: Path, task: str, classes: list[str], channels: int) -> None:
    model: nn.Module = DemoCNN(in_channels=channels, num_classes=len(classes))
    architecture = {"id": "demo-cnn", "params": {"in_channels": channels, "num_classes": len(classes)}}
    save_artifact(directory, model, {"architecture": architecture, "task": task, "input": {}, "classes": classes})


@pytest.mark.parametrize("text", EXAMPLES, ids=lambda t: t.split("\n")[0])
def test_documented_pipeline_is_valid(tmp_path, text):
    data = yaml.safe_load(text)
    task = data.get("task", "classification")
    labels = [f["label"] for f in data["postprocess"].get("findings" if task == "classification" else "segments")]
    channels = 2 if "stack" in text else 1
    _artifact(tmp_path / data["model"]["artifact"], task, ["normal", *labels], channels)
    path = tmp_path / "example.yaml"
    path.write_text(text)
    [pipeline] = load_pipeline_files([path], destinations={"pacs"})
    assert pipeline.name == data["name"]


@pytest.mark.parametrize("name", ["lung-nodule-demo", "lung-nodule-seg-demo"])
def test_the_demo_examples_are_the_shipped_files(name):
    shipped = yaml.safe_load((REPO / "pipelines" / f"{name}.yaml").read_text())
    [documented] = [yaml.safe_load(e) for e in EXAMPLES if yaml.safe_load(e)["name"] == name]
    assert documented == shipped
