"""Bring your own model: `radpipe import` of a torch.export program, an ONNX graph and an
installed package's architecture, each served by a node with the source model's scores;
and every refusal, with proof that what it refuses would have run.

The worked examples of pipelines/README.md ("Bring your own model") are run as written:
their Python exports the demo's trained classifier (standing in for "your model"), their
`radpipe import` lines run as subprocesses, and their pipeline serves the synthetic study.
"""

import io
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file
from torch import nn

from plugin.demo.series import NEGATIVE_DESCRIPTION, POSITIVE_DESCRIPTION
from plugin.loader import file_source
from plugin.metrics import Metrics
from plugin.models.artifact import ArtifactError, load_artifact, sha256_file
from plugin.models.importer import ImportRequest, import_model
from plugin.models.inputspec import InputSpec
from plugin.models.pool import ModelPool
from plugin.outputs.sr import read_measurement_report
from plugin.pipeline import load_pipeline
from plugin.prepare import prepare
from tests.conftest import DEMO_ARTIFACT, REPO, results, storescu, wait_for, write_pipeline

RADPIPE = os.path.join(os.path.dirname(sys.executable), "radpipe")
DOC = (REPO / "pipelines" / "README.md").read_text()
SECTION = DOC[DOC.index("## Bring your own model") :].split("\n## ", 1)[0]
# torch.onnx.export(dynamo=False), the exporter that needs no onnxscript, warns twice that it will go
LEGACY_ONNX_EXPORTER = "legacy TorchScript-based ONNX export|The feature will be removed"
TORCH_EXPORT, ONNX, PACKAGE = "A torch.export program", "An ONNX model", "An architecture from your own package"

# The test package's network: the demo CNN's layout, written as a team's own code would be.
NODULE_NETS = """
from torch import nn


class NoduleNet(nn.Module):
    def __init__(self, width=16, in_channels=1, num_classes=2):
        super().__init__()
        layers, previous = [], in_channels
        for factor in (1, 2, 4, 8):
            layers += [nn.Conv2d(previous, width * factor, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width * factor), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width * factor
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
"""


def _blocks(title: str) -> dict[str, str]:
    """The code blocks of one "###" part of the section, by language."""
    part = SECTION[SECTION.index(f"### {title}\n") :].split("\n### ", 1)[0]
    return dict(re.findall(r"```(\w+)\n(.*?)```", part, re.S))


def _import_lines(sh: str) -> list[list[str]]:
    """The documented `radpipe import` commands, as argument lists."""
    commands = [shlex.split(line, comments=True) for line in sh.replace("\\\n", " ").splitlines()]
    return [command for command in commands if command[:2] == ["radpipe", "import"]]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """ "Your trained classifier": the demo's (it finds nodules in the synthetic study)."""
    return load_artifact(DEMO_ARTIFACT, torch.device("cpu")).module.eval()


@pytest.fixture(scope="module")
def package_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented entry point in a real distribution (nodule-nets), installed with
    pip into a folder of its own: on sys.path or PYTHONPATH it is an installed package,
    and the test venv stays as it was."""
    root = tmp_path_factory.mktemp("nodule-nets")
    source = root / "nodule-nets"
    (source / "nodule_nets").mkdir(parents=True)
    (source / "nodule_nets" / "__init__.py").write_text(NODULE_NETS)
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "nodule-nets"\nversion = "0.1"\n\n' + _blocks(PACKAGE)["toml"]
    )
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--quiet"]
    subprocess.run([*pip, "--target", str(site), str(source)], check=True, capture_output=True, timeout=120)
    return site


def _series_scores(model: nn.Module, paths: list[Path], steps: list) -> float:
    """The source model run directly on the pipeline's preprocessed slices: the series'
    nodule probability as the documented postprocess makes it (mean of the top 3)."""
    images = torch.cat([torch.from_numpy(prepare(file_source(str(p)), steps).images) for p in paths])
    with torch.inference_mode():
        probabilities = model(images).softmax(1)[:, 1]
    return float(probabilities.topk(3).values.mean())


def test_documented_imports_serve_each_format_with_the_source_models_scores(
    start_node, tmp_path, monkeypatch, model, package_site, demo_study, dcmtk
):
    monkeypatch.chdir(tmp_path)
    exported = {TORCH_EXPORT: _blocks(TORCH_EXPORT), ONNX: _blocks(ONNX), PACKAGE: _blocks(PACKAGE)}
    exec(exported[TORCH_EXPORT]["python"], {"model": model})
    with pytest.warns(DeprecationWarning, match=LEGACY_ONNX_EXPORTER):
        exec(exported[ONNX]["python"], {"model": model})
    exec(exported[PACKAGE]["python"], {"model": model, "torch": torch})

    env = {**os.environ, "PYTHONPATH": str(package_site)}
    artifacts: dict[str, Path] = {}
    for title, blocks in exported.items():
        [command] = _import_lines(blocks["sh"])
        done = subprocess.run([RADPIPE, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("wrote "), done.stdout
        artifacts[title] = tmp_path / command[command.index("--out") + 1]
    assert json.loads((artifacts[PACKAGE] / "manifest.json").read_text())["architecture"] == {
        "id": "nodule-net",
        "params": {"width": 16},
    }

    documented = yaml.safe_load(exported[TORCH_EXPORT]["yaml"])
    for artifact in artifacts.values():
        pipeline = {**documented, "name": artifact.name, "completion": {"quiet_seconds": 1}}
        pipeline["model"] = {"artifact": f"models/{artifact.name}", "device": "cpu"}
        (tmp_path / "pipelines" / f"{artifact.name}.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))

    monkeypatch.syspath_prepend(str(package_site))  # the node finds nodule-net as installed
    node = start_node()
    series = {POSITIVE_DESCRIPTION: True, NEGATIVE_DESCRIPTION: False}
    assert storescu(node.port, *demo_study[POSITIVE_DESCRIPTION], *demo_study[NEGATIVE_DESCRIPTION]).returncode == 0
    written = wait_for(lambda: len(results(node.results_dir)) == 6 and results(node.results_dir), 180, "6 SRs")

    steps = load_pipeline(tmp_path / "pipelines" / "nodule-classifier.yaml").preprocess
    direct = {description: _series_scores(model, demo_study[description], steps) for description in series}
    assert direct[POSITIVE_DESCRIPTION] >= 0.8 > direct[NEGATIVE_DESCRIPTION]  # the threshold separates them
    uids = {
        description: {pydicom.dcmread(p).SOPInstanceUID for p in paths} for description, paths in demo_study.items()
    }
    seen = set()
    for path in written:
        [finding] = read_measurement_report(pydicom.dcmread(path))
        [description] = [d for d in series if set(finding.source_sop_instance_uids) == uids[d]]
        assert finding.finding.value == "27925004"
        assert finding.present == series[description]
        assert finding.probability == pytest.approx(direct[description], abs=1e-4)
        difference = abs(finding.probability - direct[description])
        print(f"{finding.algorithm_name} {description}: |node - source| = {difference:.2e}")
        seen.add((finding.algorithm_name, description))
    assert seen == {(a.name, d) for a in artifacts.values() for d in series}


# --- refusals: each would run code if it were loaded; each is one line, exit 1, nothing run ---


def _tiny_program(path: Path, channels: int = 1, size: int = 16) -> Path:
    """A small classifier exported with a dynamic batch (its sizes are symbolic)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    example = torch.zeros(2, channels, size, size)
    torch.export.save(
        torch.export.export(net.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path
    )
    return path


def _rewritten(source: Path, target: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    """A copy of a .pt2 archive with ``edit(entry, data)`` applied to every entry."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for info in original.infolist():
            copy.writestr(info, edit(info.filename, original.read(info.filename)))
    return target


class _Marker:
    """Unpickling this creates the folder ``name`` (in the working directory)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.name,))


def _pickled_weight(entry: str, data: bytes) -> bytes:
    if entry.endswith("model_weights_config.json"):
        config = json.loads(data)
        config["config"]["0.weight"]["use_pickle"] = True  # its payload is now torch.load(weights_only=False)-ed
        return json.dumps(config).encode()
    if entry.endswith("data/weights/weight_0"):
        payload = io.BytesIO()
        torch.save(_Marker("marker-pickled-weight"), payload)
        return payload.getvalue()
    return data


def _program_edit(change: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def edit(entry: str, data: bytes) -> bytes:
        if not entry.endswith("models/model.json"):
            return data
        program = json.loads(data)
        change(program)
        return json.dumps(program).encode()

    return edit


def _guard(program: dict) -> None:  # ExportedProgram.module() exec()s guards_code
    program["guards_code"] = ["__import__('os').mkdir('marker-guard') is None"]


def _symbolic_size(program: dict) -> None:  # torch.export.load sympify()s (eval) every expr_str
    sizes = program["graph_module"]["graph"]["tensor_values"]["input"]["sizes"]
    symbol = sizes[0]["as_expr"]["expr_str"]
    sizes[0]["as_expr"]["expr_str"] = f"{symbol} + 0*len(str(__import__('os').mkdir('marker-symbolic-size')))"


def _name_edit(entry: str, data: bytes) -> bytes:
    """A parameter name that closes the string torch.fx pastes it into, and calls mkdir."""
    if not entry.endswith(".json"):
        return data
    evil = '0"), getattr(__import__("os"), "mkdir")("marker-parameter-name"), getattr(self, "0'
    return data.replace(b'"0.weight"', json.dumps(evil).encode())


VECTORS = {
    "marker-pickled-weight": (_pickled_weight, "is a pickle"),
    "marker-guard": (_program_edit(_guard), "guard"),
    "marker-symbolic-size": (_program_edit(_symbolic_size), "symbolic size"),
    "marker-parameter-name": (_name_edit, "is not a name"),
}

# Loads each file as torch alone would (and the weights as torch.load does by default
# before 2.6), to show that every refused file would have run its payload.
_CONTROL = """
import sys, torch
for path in sys.argv[1:]:
    try:
        if path.endswith(".pt"):
            torch.load(path, weights_only=False)
        else:
            torch.export.load(path).module()(torch.zeros(2, 1, 16, 16))
    except Exception:
        pass
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One .pt2 per way torch.export.load + module() runs a file's code, and a weights
    file with a pickled payload; the payloads are proven live (in a subprocess, as torch
    alone would load them), then their markers are removed."""
    folder = tmp_path_factory.mktemp("hostile")
    clean = _tiny_program(folder / "clean.pt2")
    for marker, (edit, _) in VECTORS.items():
        _rewritten(clean, folder / f"{marker}.pt2", edit)
    torch.save({"features.0.weight": _Marker("marker-weights")}, folder / "marker-weights.pt")
    files = sorted(str(p) for p in folder.glob("marker-*"))
    subprocess.run([sys.executable, "-c", _CONTROL, *files], cwd=folder, check=True, timeout=120, capture_output=True)
    for marker in [*VECTORS, "marker-weights"]:
        assert (folder / marker).is_dir(), f"{marker}: the payload did not run when torch loaded it alone"
        (folder / marker).rmdir()
    return folder


@pytest.mark.parametrize("marker", list(VECTORS))
def test_a_program_that_loading_would_execute_is_refused_at_import_and_at_load(
    hostile, marker, tmp_path, monkeypatch, radpipe
):
    monkeypatch.chdir(hostile)  # where a payload would create its marker
    program = hostile / f"{marker}.pt2"
    code, out = radpipe("import", str(program), "--out", str(tmp_path / "out"), "--classes", "a,b")
    assert code == 1 and not (tmp_path / "out").exists()
    [line] = out.splitlines()
    assert line.startswith(f"radpipe import: {program}: refused: ") and VECTORS[marker][1] in line

    artifact = tmp_path / "artifact"  # the same program in an artifact whose hashes all match
    artifact.mkdir()
    (artifact / "model.pt2").write_bytes(program.read_bytes())
    manifest = {
        "format": "torch-export",
        "input": {"kind": "slice", "channels": 1, "height": 16, "width": 16, "batch": None},
        "classes": ["a", "b"],
        "files": {"model.pt2": sha256_file(artifact / "model.pt2")},
    }
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=VECTORS[marker][1]):
        load_artifact(artifact, torch.device("cpu"))
    assert not (hostile / marker).exists()


def test_weights_with_a_pickled_payload_are_refused(hostile, tmp_path, monkeypatch, radpipe):
    monkeypatch.chdir(hostile)
    weights = hostile / "marker-weights.pt"
    argv = ["import", "demo-cnn", "--weights", str(weights), "--input", "1x128x128", "--classes", "a,b"]
    code, out = radpipe(*argv, "--out", str(tmp_path / "out"))
    assert code == 1 and not (tmp_path / "out").exists()
    assert out == (
        f"radpipe import: {weights}: holds a pickled posix.mkdir, not only tensors; radpipe reads weights as "
        "tensors alone (torch.load weights_only=True): save model.state_dict(), or safetensors\n"
    )
    assert not (hostile / "marker-weights").exists()


def test_a_file_that_is_not_onnx_is_refused(tmp_path, radpipe):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"GIF89a: a picture, not a graph")
    code, out = radpipe("import", str(fake), "--out", str(tmp_path / "out"), "--classes", "a,b")
    assert code == 1 and not (tmp_path / "out").exists()
    assert re.fullmatch(rf"radpipe import: {fake}: not an ONNX model ONNX Runtime can run: .*INVALID_PROTOBUF.*\n", out)


def test_onnx_without_onnx_runtime_names_the_extra(tmp_path, model, monkeypatch, radpipe):
    graph = tmp_path / "model.onnx"
    with pytest.warns(DeprecationWarning, match=LEGACY_ONNX_EXPORTER):
        torch.onnx.export(model, (torch.zeros(1, 1, 128, 128),), str(graph), dynamo=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    code, out = radpipe("import", str(graph), "--out", str(tmp_path / "out"), "--classes", "a,b")
    assert code == 1
    assert out == (
        f"radpipe import: {graph}: ONNX models need ONNX Runtime, which is not installed: pip install 'radpipe[onnx]'\n"
    )


def test_an_unknown_architecture_is_refused_and_the_known_ones_listed(package_site, tmp_path, monkeypatch, radpipe):
    monkeypatch.syspath_prepend(str(package_site))
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights))
    code, out = radpipe("import", "nodule-nett", "--weights", str(weights), "--out", str(tmp_path / "out"))
    assert code == 1
    assert out == (
        "radpipe import: nodule-nett: neither a .pt2 or .onnx file nor a known architecture: unknown architecture "
        "'nodule-nett'; known: demo-cnn, densenet, densenet3d, nodule-net, resnet (and monai.networks.nets.<Name>)\n"
    )


@pytest.mark.parametrize("kind", ["pt2", "onnx"])
def test_a_tampered_imported_artifact_is_refused(kind, tmp_path, model, radpipe):
    source = tmp_path / f"model.{kind}"
    if kind == "pt2":
        _tiny_program(source)
    else:
        with pytest.warns(DeprecationWarning, match=LEGACY_ONNX_EXPORTER):
            torch.onnx.export(model, (torch.zeros(1, 1, 128, 128),), str(source), dynamo=False)
    artifact, _ = import_model(ImportRequest(str(source), tmp_path / "artifact", classes=["a", "b"]))
    assert radpipe("validate", str(artifact))[0] == 0
    model_file = artifact / f"model.{kind}"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 1
    model_file.write_bytes(bytes(data))
    code, out = radpipe("validate", str(artifact))
    assert code == 1
    assert re.fullmatch(
        rf"{model_file}: sha256 \w+ does not match the manifest's \w+; refusing to load a modified artifact\n", out
    )
    with pytest.raises(ArtifactError, match="refusing to load a modified artifact"):
        load_artifact(artifact, torch.device("cpu"))


def test_a_model_whose_input_the_preprocessing_does_not_yield_is_refused(tmp_path, radpipe):
    program = _tiny_program(tmp_path / "rgb.pt2", channels=3, size=224)
    artifact, _ = import_model(ImportRequest(str(program), tmp_path / "rgb", classes=["normal", "nodule"]))
    path = write_pipeline(tmp_path / "pipelines", model={"artifact": str(artifact)})  # window + resize to 128 x 128
    code, out = radpipe("validate", str(path))
    assert code == 1
    problem = "the model takes 3x224x224 input but the pipeline's preprocessing yields 1x128x128"
    assert re.fullmatch(rf"{path}:\d+:\d+: model.artifact: {problem}\n", out)
    with pytest.raises(ArtifactError, match=f"cannot serve pipeline lung-nodule-demo: {problem}"):
        ModelPool(Metrics(CollectorRegistry())).get(load_pipeline(path))


# --- serving details ---


def test_a_program_exported_for_one_batch_size_serves_any(tmp_path, model):
    program = tmp_path / "batch1.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 128, 128),)), program)
    artifact, imported = import_model(ImportRequest(str(program), tmp_path / "artifact", classes=["normal", "nodule"]))
    assert imported.input == InputSpec(1, (128, 128), "float32", 1)
    served = load_artifact(artifact, torch.device("cpu"))
    images = torch.rand(5, 1, 128, 128)
    with torch.inference_mode():
        assert torch.allclose(served.module(images), model(images), atol=1e-5)


def test_a_monai_network_imports_from_safetensors_weights(tmp_path):
    from monai.networks.nets import DenseNet

    params = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_features": 4, "growth_rate": 4}
    network = DenseNet(**params, block_config=(1, 1)).eval()
    save_file(network.state_dict(), str(tmp_path / "weights.safetensors"))
    request = ImportRequest(
        "monai.networks.nets.DenseNet",
        tmp_path / "artifact",
        classes=["a", "b", "c"],
        input=InputSpec.parse("1x32x32"),
        weights=tmp_path / "weights.safetensors",
        params={**params, "block_config": [1, 1]},
    )
    artifact, _ = import_model(request)
    served = load_artifact(artifact, torch.device("cpu"))
    images = torch.rand(4, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(served.module(images), network(images))
