"""Optimized artifacts, for real: pruning removes channels, int8 runs in the node, the
gate refuses what it must, and the SR says exactly which model and precision ran.

Data sets are tiny (tens of phantom slices, a fraction of an epoch) so the file runs in
a couple of minutes on two cores; what is checked is behaviour, not accuracy.
"""

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from torch import nn

from plugin.accel.bench import fp32_module
from plugin.accel.data import DataSets, Split, phantom_split
from plugin.accel.optimize import optimize, optimize_artifact
from plugin.accel.recipe import Recipe
from plugin.demo.train import PREPROCESS
from plugin.models.artifact import ArtifactError, load_artifact, read_manifest, save_artifact
from plugin.models.registry import build
from plugin.models.serving import BucketedModule
from plugin.outputs.sr import read_measurement_report
from plugin.pipeline import PipelineError, load_pipeline
from tests.conftest import DEMO_PIPELINE, results, storescu, wait_for, write_pipeline

CLASSES = ["normal", "nodule"]
LOOSE = {"max_auc_drop": 1.0, "max_per_class_auc_drop": 1.0}  # behaviour under test, not accuracy


@pytest.fixture(scope="module")
def data() -> DataSets:
    """48 training and 48 held-out phantom slices through the demo preprocessing."""
    train_seed, heldout_seed = np.random.SeedSequence(11).spawn(2)
    train = phantom_split(PREPROCESS, train_seed, 48, CLASSES, workers=1)
    heldout = phantom_split(PREPROCESS, heldout_seed, 48, CLASSES, workers=1)
    calibration = Split(train.images[:16], train.labels[:16], "first 16 training images")
    return DataSets(train, heldout, calibration)


def _recipe(cpu: str = "int8_static", **prune: object) -> Recipe:
    return Recipe.model_validate(
        {
            "prune": {"ratio": 0.5, "iterative_steps": 2, "finetune_epochs": 0.5, **prune},
            "quantize": {"cpu": cpu, "buckets": [8]},
            "finetune": {"batch_size": 16},
            "accept": LOOSE,
        }
    )


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory: pytest.TempPathFactory, data: DataSets) -> Path:
    """The demo model pruned (L1, 2 steps) and statically quantized to int8."""
    target = tmp_path_factory.mktemp("optimized") / "lung-nodule-demo-pruned-int8"
    outcome = optimize(load_pipeline(DEMO_PIPELINE), _recipe(), target, data=data)
    assert outcome.target == target, outcome.failures
    return target


def _conv_widths(module: nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]


def _assert_serves(start_node, tmp_path, artifact: Path, demo_study, loaded, manifest: dict) -> None:
    """The artifact runs in a node, and the SR and the model metric record its hash and precision."""
    write_pipeline(tmp_path / "pipelines", model={"artifact": str(artifact), "device": "cpu", "batch_size": 8})
    node = start_node()
    assert storescu(node.port, *demo_study["Demo chest CT, nodules"][:6]).returncode == 0
    [path] = wait_for(lambda: results(node.results_dir), timeout=120, what="the SR")
    [finding] = read_measurement_report(pydicom.dcmread(path))
    precision = manifest["precision"]
    assert f"model_sha256={loaded.sha256}" in finding.algorithm_parameters
    assert f"precision={precision}" in finding.algorithm_parameters
    labels = {"pipeline": "lung-nodule-demo", "model": manifest["name"], "precision": precision, "device": "cpu"}
    assert node.metrics.registry.get_sample_value(
        "radpipe_model_info", {**labels, "sparsity": str(manifest["sparsity"])}
    )


def test_pruning_removes_channels_and_the_pruned_model_serves(start_node, tmp_path, data, demo_study, dcmtk):
    target = tmp_path / "pruned"
    outcome = optimize(load_pipeline(DEMO_PIPELINE), _recipe(cpu="none"), target, data=data)
    assert outcome.target == target
    manifest = json.loads((target / "manifest.json").read_text())
    before, after = manifest["complexity"]["before"], manifest["complexity"]["after"]
    assert after["params"] < before["params"] / 2 and after["macs"] < before["macs"] / 2
    assert manifest["sparsity"] == pytest.approx(1 - after["params"] / before["params"], abs=1e-4)
    # the architecture's own parameters describe the pruned widths (demo CNN: one per block)
    assert manifest["architecture"]["params"]["channels"] == [8, 16, 32, 64]
    assert manifest["layers"]["features.4"] == {"in": 8, "out": 16, "groups": 1}
    assert manifest["precision"] == "fp32" and "quantization" not in manifest
    assert {"steps", "sha256"} <= set(manifest["preprocessing"])
    assert manifest["evaluation"]["variants"]["pruned fp32"]["passed"]

    loaded = load_artifact(target, torch.device("cpu"))
    assert _conv_widths(loaded.module) == [8, 16, 32, 64]
    assert sum(p.numel() for p in loaded.module.parameters()) == after["params"]

    _assert_serves(start_node, tmp_path, target, demo_study, loaded, manifest)


def test_int8_artifact_runs_in_the_node_and_the_sr_records_hash_and_precision(
    start_node, tmp_path, int8_artifact, data, demo_study, dcmtk
):
    manifest = json.loads((int8_artifact / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["quantization"]["scheme"] == "int8_static"
    assert manifest["quantization"]["calibration"]["samples"] == 16
    assert {"torch", "torchao", "torch-pruning"} <= set(manifest["versions"])
    loaded = load_artifact(int8_artifact, torch.device("cpu"))
    assert isinstance(loaded.module, BucketedModule) and loaded.precision == "int8"
    with torch.inference_mode():  # int8 stays close to its own fp32 weights on real images
        images = data.heldout.images[:11]  # not a bucket size: padded and sliced back
        int8, fp32 = loaded.module(images), loaded.module.source(images)
    assert int8.shape == (11, 2)
    assert (int8.softmax(1) - fp32.softmax(1)).abs().max() < 0.1

    _assert_serves(start_node, tmp_path, int8_artifact, demo_study, loaded, manifest)


def test_tampered_optimized_artifact_is_refused(tmp_path, int8_artifact):
    copy = tmp_path / "tampered"
    shutil.copytree(int8_artifact, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor (observer statistics sort last)
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="refusing to load a modified artifact"):
        load_artifact(copy, torch.device("cpu"))


def test_int8_artifact_from_another_torchao_release_is_refused_with_both_versions(tmp_path, int8_artifact):
    copy = tmp_path / "older"
    shutil.copytree(int8_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["versions"]["torchao"] = "0.14.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    installed = importlib.metadata.version("torchao")
    with pytest.raises(ArtifactError, match=rf"torchao 0\.14\.0; this node runs torch .* and torchao {installed}"):
        load_artifact(copy, torch.device("cpu"))


def test_recipe_that_cannot_meet_its_limit_fails_with_figures_and_writes_nothing(tmp_path):
    recipe = {
        "prune": {"ratio": 0.9, "iterative_steps": 1, "finetune_epochs": 0, "round_to": 1},
        "quantize": {"cpu": "none"},
        "data": {"train_samples": 8, "heldout_samples": 24},
        "accept": {"max_auc_drop": 0.0, "max_per_class_auc_drop": 0.0},
    }
    pipeline = write_pipeline(tmp_path, model={"artifact": str(DEMO_PIPELINE.parent / "models/lung-nodule-demo")})
    data = yaml.safe_load(pipeline.read_text())
    data["model"]["optimize"] = recipe
    pipeline.write_text(yaml.safe_dump(data))
    target = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "plugin", "optimize", str(pipeline), "--out", str(target)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "accuracy gate failed; nothing written" in run.stdout
    assert "drop" in run.stdout and "> max_auc_drop 0.0" in run.stdout
    assert "original fp32" in run.stdout and "pruned fp32" in run.stdout
    assert not target.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_recipe_keys_are_validated_with_their_location(tmp_path):
    pipeline = write_pipeline(tmp_path, model={"artifact": str(DEMO_PIPELINE.parent / "models/lung-nodule-demo")})
    data = yaml.safe_load(pipeline.read_text())
    data["model"]["optimize"] = {"prune": {"ratio": 0.5, "importance": "random"}, "quantise": {}}
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(PipelineError) as error:
        load_pipeline(pipeline)
    message = str(error.value)
    assert "model.optimize.prune.importance" in message and "model.optimize.quantise" in message
    assert f"{pipeline}:" in message


@pytest.mark.parametrize(
    ("arch", "importance", "cpu"),
    [("resnet", "taylor", "int8_static"), ("densenet", "slimming", "int8_static"), ("demo-cnn", "l2", "int8_qat")],
)
def test_architectures_prune_finetune_quantize_and_load(tmp_path, data, arch, importance, cpu):
    """ResNet (residual sums, Taylor importance) and DenseNet (concatenations, network
    slimming) through the whole recipe; quantization-aware training on the demo CNN. Each
    ends as an artifact the node loads."""
    torch.manual_seed(0)
    small = {"resnet": {"layers": [1, 1], "widths": [16, 32]}, "densenet": {"block_config": [1, 1]}}
    params = {"in_channels": 1, "num_classes": 2, **small.get(arch, {})}
    module = build({"id": arch, "params": params})
    source = save_artifact(
        tmp_path / arch,
        module,
        {
            "name": arch,
            "architecture": {"id": arch, "params": params},
            "input": {"channels": 1, "height": 128, "width": 128},
            "classes": CLASSES,
        },
    )
    original = load_artifact(source, torch.device("cpu"))
    widths = _conv_widths(original.module)
    outcome = optimize_artifact(
        original, _recipe(cpu, importance=importance), data, PREPROCESS, ["nodule"], "softmax", tmp_path / "out"
    )
    assert outcome.target is not None, outcome.failures
    manifest = read_manifest(outcome.target)  # hash-checked, as the node reads it
    assert manifest["complexity"]["after"]["params"] < manifest["complexity"]["before"]["params"]
    assert sum(_conv_widths(fp32_module(outcome.target))) < sum(widths)
    # the gate scored the candidate as the node loads it (int8 lowered and compiled):
    # the same weights file, byte for byte, as the one written
    assert manifest["evaluation"]["variants"][f"served pruned+{cpu} (int8, cpu)"]["passed"]


def test_user_data_set_is_a_dicom_folder_with_a_labels_csv(tmp_path, demo_study):
    """Files are read with the loader's modality LUT and the pipeline's preprocessing;
    labels are class names of the model, checked with their CSV line."""
    from plugin.accel.data import load_data
    from plugin.accel.recipe import Calibration, Data

    folder = tmp_path / "dataset"
    rows = ["file,label"]
    for description, label in (("Demo chest CT, nodules", "nodule"), ("Demo chest CT, no nodules", "normal")):
        for path in demo_study[description][:4]:
            target = folder / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            rows.append(f"{label}/{path.name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    source = Data(source="dataset", labels=Path("dataset/labels.csv"))
    # two series only: the hash would hold out one or none of them, so give the split
    split = [f"{row},{'heldout' if i % 4 == 0 else 'train'}" for i, row in enumerate(rows[1:])]
    (folder / "labels.csv").write_text("\n".join([rows[0] + ",split", *split]) + "\n")
    sets = load_data(PREPROCESS, source, Calibration(samples=4), CLASSES, tmp_path)
    assert sets.train.images.shape == (6, 1, 128, 128) and len(sets.heldout) == 2
    assert sorted(sets.heldout.labels.tolist()) == [0, 1]
    assert float(sets.train.images.min()) >= 0.0 and float(sets.train.images.max()) <= 1.0  # lung window
    assert len(sets.calibration) == 4

    (folder / "labels.csv").write_text("file,label\nnodule/x.dcm,tumour\n")
    with pytest.raises(ValueError, match=r"labels\.csv:2: label 'tumour' is not a class"):
        load_data(PREPROCESS, source, Calibration(samples=4), CLASSES, tmp_path)
