"""Optimized artifacts, for real: pruning removes channels, int8 runs in the node, the
gate refuses what it must, and the SR says exactly which model and precision ran. The
same for imported models: a torch.export program gets torchao int8 on its own graph, an
ONNX graph gets ONNX Runtime's int8, and what does not apply to a format is refused.

Data sets are tiny (tens of phantom slices, a fraction of an epoch) so the file runs in
a couple of minutes on two cores; what is checked is behaviour, not accuracy.
"""

import copy
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
from safetensors.torch import load_file
from torch import Tensor, nn

from plugin.accel.bench import fp32_module
from plugin.accel.data import DataSets, Split, phantom_split
from plugin.accel.export import export_onnx
from plugin.accel.optimize import optimize, optimize_artifact
from plugin.accel.recipe import Recipe
from plugin.demo.train import PREPROCESS
from plugin.models.artifact import ArtifactError, load_artifact, read_manifest, save_artifact
from plugin.models.importer import ImportRequest, import_model
from plugin.models.onnx_model import OnnxModule
from plugin.models.registry import build
from plugin.models.serving import (
    OBSERVER_PREFIX,
    BucketedModule,
    compile_program,
    exported_graph,
    int8_max_pools,
    restore_int8,
)
from plugin.outputs.sr import read_measurement_report
from plugin.pipeline import PipelineError, load_pipeline
from tests.conftest import DEMO_ARTIFACT, DEMO_PIPELINE, results, storescu, wait_for, write_pipeline

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
        "radpipe_model_info", {**labels, "sparsity": str(manifest.get("sparsity", 0.0))}
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


def test_int8_max_pools_run_on_the_uint8_tensor_and_the_logits_stay_bit_for_bit(int8_artifact, data):
    """The int8 program's max-pools: each dequantize -> max_pool2d -> quantize at one scale
    becomes a max-pool of the uint8 tensor (inductor's vectorized loop instead of ATen's
    quantized max_pool2d, a scalar loop below 32 channels), and the compiled program's
    logits are the same as without the pass."""
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default

    def float_pools(graph: nn.Module) -> int:
        return sum(
            1
            for node in graph.graph.nodes
            if node.target is torch.ops.aten.max_pool2d.default and node.args[0].target is dequantize
        )

    tensors = load_file(str(int8_artifact / "weights.safetensors"))
    observers = {k.removeprefix(OBSERVER_PREFIX): v for k, v in tensors.items() if k.startswith(OBSERVER_PREFIX)}
    module = fp32_module(int8_artifact)

    def converted() -> nn.Module:
        return restore_int8(exported_graph(module, "int8_static", data.heldout.images[:2]), "int8_static", observers)

    unchanged, passed = converted(), int8_max_pools(converted())
    assert float_pools(unchanged) == 4 and float_pools(passed) == 0  # demo-cnn: a pool after each of 4 convs
    with torch.inference_mode():
        images = data.heldout.images[:8]
        assert torch.equal(compile_program(passed)(images), compile_program(unchanged)(images))


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


MONAI_DENSENET = "monai.networks.nets.DenseNet"


@pytest.mark.parametrize(
    ("arch", "importance", "cpu"),
    [
        ("resnet", "taylor", "int8_static"),
        ("densenet", "slimming", "int8_static"),
        ("demo-cnn", "l2", "int8_qat"),
        (MONAI_DENSENET, "l1", "none"),
    ],
)
def test_architectures_prune_finetune_quantize_and_load(tmp_path, data, arch, importance, cpu):
    """ResNet (residual sums, Taylor importance) and DenseNet (concatenations, network
    slimming) through the whole recipe; quantization-aware training on the demo CNN; a
    MONAI network named by its ``monai.networks.nets`` id, as a bundle or an import names
    it, pruned (its int8 is the densenet case's: the same network). Each ends as an
    artifact the node loads."""
    torch.manual_seed(0)
    common = {"in_channels": 1, "num_classes": 2}
    params = {
        "resnet": {**common, "layers": [1, 1], "widths": [16, 32]},
        "densenet": {**common, "block_config": [1, 1]},
        MONAI_DENSENET: {
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 2,
            "init_features": 16,
            "growth_rate": 8,
            "block_config": [1, 1],
            "bn_size": 2,
        },
    }.get(arch, common)
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
    served = "served pruned (fp32, cpu)" if cpu == "none" else f"served pruned+{cpu} (int8, cpu)"
    assert manifest["evaluation"]["variants"][served]["passed"]


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


# --- imported models: a torch.export program and an ONNX graph --------------------------


def _int8(accept: dict | None = None) -> Recipe:
    """Static int8 alone, under the default accuracy gate unless told otherwise."""
    return Recipe.model_validate({"quantize": {"cpu": "int8_static", "buckets": [8]}, "accept": accept or {}})


def _demo() -> nn.Module:
    return load_artifact(DEMO_ARTIFACT, torch.device("cpu")).module.eval()


def _import_program(model: nn.Module, folder: Path) -> Path:
    """``model`` exported with a dynamic batch, saved as a .pt2 and imported."""
    program = torch.export.export(model, (torch.zeros(2, 1, 128, 128),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, folder / "model.pt2")
    return import_model(ImportRequest(str(folder / "model.pt2"), folder / "artifact", classes=CLASSES))[0]


@pytest.fixture(scope="module")
def program_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's trained classifier as users bring it: a .pt2, imported."""
    return _import_program(_demo(), tmp_path_factory.mktemp("program"))


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's trained classifier as an ONNX graph, imported."""
    folder = tmp_path_factory.mktemp("onnx")
    graph = export_onnx(_demo(), torch.zeros(2, 1, 128, 128), folder / "model.onnx")
    return import_model(ImportRequest(str(graph), folder / "artifact", classes=CLASSES))[0]


def _source_pipeline(folder: Path, artifact: Path, optimize: dict | None = None) -> Path:
    model = {"artifact": str(artifact), **({"optimize": optimize} if optimize else {})}
    return write_pipeline(folder, model=model)


def test_an_imported_program_optimized_to_int8_passes_the_gate_and_serves(
    start_node, tmp_path, program_artifact, data, demo_study, dcmtk
):
    target = tmp_path / "program-int8"
    pipeline = load_pipeline(_source_pipeline(tmp_path / "source", program_artifact))
    outcome = optimize(pipeline, _int8(), target, data=data)
    assert outcome.target == target, outcome.failures
    manifest = read_manifest(target)
    assert manifest["format"] == "torch-export" and manifest["precision"] == "int8"
    assert manifest["quantization"]["scheme"] == "int8_static" and manifest["quantization"]["buckets"] == [8]
    assert manifest["evaluation"]["accept"] == {"max_auc_drop": 0.01, "max_per_class_auc_drop": 0.02}
    assert manifest["evaluation"]["variants"]["served int8_static (int8, cpu)"]["passed"]
    # the program is kept as imported; beside it only observer statistics, no weights of its own
    assert (target / "model.pt2").read_bytes() == (program_artifact / "model.pt2").read_bytes()
    observers = load_file(str(target / "weights.safetensors"))
    assert observers and all(key.startswith("observer.activation_post_process_") for key in observers)

    loaded = load_artifact(target, torch.device("cpu"))
    source = load_artifact(program_artifact, torch.device("cpu"))
    assert isinstance(loaded.module.run, BucketedModule) and loaded.precision == "int8"
    assert loaded.sha256 not in (source.sha256, manifest["files"]["weights.safetensors"])  # both files make it
    with torch.inference_mode():
        images = data.heldout.images[:11]  # not a bucket size: padded and sliced back
        int8, fp32 = loaded.module(images), source.module(images)
    assert int8.shape == (11, 2) and (int8.softmax(1) - fp32.softmax(1)).abs().max() < 0.1

    _assert_serves(start_node, tmp_path, target, demo_study, loaded, manifest)


def test_an_onnx_source_gets_an_onnx_runtime_int8_artifact_that_serves(
    start_node, tmp_path, onnx_artifact, data, demo_study, dcmtk
):
    target = tmp_path / "onnx-int8"
    pipeline = load_pipeline(_source_pipeline(tmp_path / "source", onnx_artifact))
    outcome = optimize(pipeline, _int8(), target, data=data)
    assert outcome.target == target, outcome.failures
    manifest = read_manifest(target)
    assert manifest["format"] == "onnx" and manifest["precision"] == "int8"
    assert manifest["quantization"]["quantizer"].startswith("ONNX Runtime quantize_static (QDQ")
    assert manifest["quantization"]["calibration"]["samples"] == 16
    assert b"QuantizeLinear" in (target / "model.onnx").read_bytes()

    loaded = load_artifact(target, torch.device("cpu"))
    assert isinstance(loaded.module.run, OnnxModule) and loaded.sha256 == manifest["files"]["model.onnx"]
    with torch.inference_mode():
        images = data.heldout.images[:11]
        int8, fp32 = loaded.module(images), load_artifact(onnx_artifact, torch.device("cpu")).module(images)
    assert (int8.softmax(1) - fp32.softmax(1)).abs().max() < 0.1

    _assert_serves(start_node, tmp_path, target, demo_study, loaded, manifest)


REFUSED = {
    "prune a program": (
        "program_artifact",
        {"prune": {"ratio": 0.5}},
        "cannot prune it: pruning removes channels from an nn.Module's layers, which the node rebuilds from a "
        "registered architecture, but this torch-export artifact holds a fixed graph; prune before exporting, "
        "or import the architecture with its weights (radpipe import ID --weights FILE)",
    ),
    "prune an ONNX graph": ("onnx_artifact", {"prune": {"ratio": 0.5}}, "cannot prune it: "),
    "QAT of a program": (
        "program_artifact",
        {"quantize": {"cpu": "int8_qat"}},
        "quantize.cpu int8_qat does not apply to this torch-export model, which radpipe optimizes by int8 "
        "quantization (int8_static or int8_dynamic) only; QAT would fine-tune the weights, which the program "
        "holds as imported",
    ),
    "torchao int8 of an ONNX graph": (
        "onnx_artifact",
        {"quantize": {"cpu": "int8_dynamic"}},
        "quantize.cpu int8_dynamic does not apply to this onnx model, which radpipe optimizes by int8 "
        "quantization (int8_static) only",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_does_not_apply_to_an_imported_format_is_refused_in_one_line(case, request, tmp_path, radpipe):
    fixture, recipe, reason = REFUSED[case]
    artifact = request.getfixturevalue(fixture)
    pipeline = _source_pipeline(tmp_path, artifact, recipe)
    code, out = radpipe("optimize", str(pipeline), "--out", str(tmp_path / "out"))
    assert code == 2
    [line] = out.splitlines()
    assert line.startswith(f"{artifact}: {reason}")
    assert not (tmp_path / "out").exists()


class _ZeroChannel(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([images, torch.zeros_like(images)], 1)


def test_a_program_whose_int8_fails_the_gate_writes_nothing(tmp_path, radpipe):
    """The demo classifier with a second, all-zero input channel whose first-layer weights
    are huge: fp32 is the demo's (zero times anything adds nothing), but each filter's int8
    scale follows its largest weight, so every real weight rounds to zero."""
    fragile = copy.deepcopy(_demo())
    first = fragile.features[0]
    wide = nn.Conv2d(2, first.out_channels, 3, padding=1, bias=False)
    wide.weight.data = torch.cat([first.weight.data, torch.full_like(first.weight.data, 1e4)], 1)
    fragile.features[0] = wide
    artifact = _import_program(nn.Sequential(_ZeroChannel(), fragile).eval(), tmp_path)
    recipe = {
        "quantize": {"cpu": "int8_static", "buckets": [8]},
        "calibration": {"samples": 16},
        "data": {"train_samples": 16, "heldout_samples": 32},
    }
    target = tmp_path / "pipelines" / "out"
    pipeline = _source_pipeline(tmp_path / "pipelines", artifact, recipe)
    code, out = radpipe("optimize", str(pipeline), "--out", str(target))
    assert code == 1
    assert "accuracy gate failed; nothing written" in out and "> max_auc_drop 0.01" in out
    assert "served int8_static (int8, cpu)" in out
    assert not target.exists() and not any(p.name.startswith(".out") for p in target.parent.iterdir())
