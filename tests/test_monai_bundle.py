"""MONAI bundles: `radpipe import BUNDLE` builds only networks of monai.networks.nets from
literal arguments, reads the weights as tensors, takes the input and classes from
network_data_format and translates the bundle's preprocessing into pipeline keys.

The worked example of pipelines/README.md ("A MONAI bundle") is run as written: its
configs become a bundle folder, MONAI builds its network as MONAI would, the documented
`radpipe import` runs as a subprocess and prints what the README shows, and a node serving
the documented pipeline writes that network's own scores. Every refusal comes with proof,
through MONAI's own ConfigParser or torch.load, that what it refuses would have run.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
import yaml
from monai import transforms
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from torch import nn

from plugin.demo.phantom import PIXEL_SPACING_MM
from plugin.demo.series import NEGATIVE_DESCRIPTION, POSITIVE_DESCRIPTION, SLICE_THICKNESS_MM
from plugin.loader import file_source
from plugin.models.monai_bundle import Bundle, network_id, translate
from plugin.outputs.sr import read_measurement_report
from plugin.prepare import prepare
from plugin.preprocess import PreprocessStep, preprocess
from tests.conftest import REPO, results, storescu, wait_for

RADPIPE = os.path.join(os.path.dirname(sys.executable), "radpipe")
DOC = (REPO / "pipelines" / "README.md").read_text()
PART = DOC[DOC.index("### A MONAI bundle\n") :].split("\n### ", 1)[0]
SERIES = {POSITIVE_DESCRIPTION: True, NEGATIVE_DESCRIPTION: False}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # MONAI's world is RAS, DICOM's LPS


def _documented_files() -> dict[str, str]:
    """The README's bundle files, each by the last path named before its block."""
    blocks = re.findall(r"(.*?)```json\n(.*?)```", PART, re.S)
    return {re.findall(r"`(nodule-bundle/[\w/.]+)`", prose)[-1]: block for prose, block in blocks}


def _block(language: str) -> str:
    [block] = re.findall(rf"```{language}\n(.*?)```", PART, re.S)
    return block


def _write_bundle(folder: Path, metadata: dict, inference: dict, weights: object) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(weights, folder / "models" / "model.pt")
    return folder


def _trained(config: dict, inputs: torch.Tensor, labels: torch.Tensor, steps: int) -> nn.Module:
    """A few steps of Adam on the study itself, labelled by series, so that the network's
    verdicts differ between the two series (what is checked is that the node serves
    exactly this network, not that it generalises). In eval mode throughout: batch norm
    keeps its statistics, so the network serves as it trained, even on two volumes. The
    network is ``config``'s ``network_def`` as MONAI builds it, from a fixed seed."""
    torch.manual_seed(0)
    network = ConfigParser(config).get_parsed_content("network_def")
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    network.eval()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(network(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network


def _finding_by_series(node_results: Path, study: dict[str, list[Path]]) -> dict[str, Any]:
    uids = {d: {pydicom.dcmread(p).SOPInstanceUID for p in paths} for d, paths in study.items()}
    found = {}
    for path in results(node_results):
        [finding] = read_measurement_report(pydicom.dcmread(path))
        [description] = [d for d in SERIES if set(finding.source_sop_instance_uids) == uids[d]]
        found[description] = finding
    return found


# --- the documented 2D bundle, through a node -----------------------------------------------------


def test_the_documented_bundle_serves_its_networks_own_scores(start_node, tmp_path, monkeypatch, demo_study, dcmtk):
    monkeypatch.chdir(tmp_path)
    files = _documented_files()
    assert set(files) == {"nodule-bundle/configs/metadata.json", "nodule-bundle/configs/inference.json"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "nodule-bundle" / "models").mkdir()

    documented = yaml.safe_load(_block("yaml"))
    steps = [PreprocessStep.model_validate(step) for step in documented["preprocess"]]
    slices = {
        d: torch.cat([torch.from_numpy(prepare(file_source(str(p)), steps).images) for p in demo_study[d]])
        for d in SERIES
    }
    labels = torch.cat([torch.full((len(slices[d]),), int(SERIES[d])) for d in SERIES])
    inference = json.loads(files["nodule-bundle/configs/inference.json"])
    network = _trained(inference, torch.cat(list(slices.values())), labels, steps=30)
    exec(_block("python"), {"model": network, "torch": torch})

    [command] = [shlex.split(line) for line in _block("sh").splitlines() if line.startswith("radpipe import")]
    done = subprocess.run([RADPIPE, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == _block("text")  # what the README shows is what import prints
    artifact = tmp_path / command[command.index("--out") + 1]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["architecture"]["id"] == "monai.networks.nets.DenseNet121"
    assert manifest["imported_from"]["pipeline"]["preprocess"] == documented["preprocess"]

    pipeline = {**documented, "completion": {"quiet_seconds": 1}, "model": {**documented["model"], "device": "cpu"}}
    (tmp_path / "pipelines" / "nodule-bundle.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    node = start_node()
    assert storescu(node.port, *demo_study[POSITIVE_DESCRIPTION], *demo_study[NEGATIVE_DESCRIPTION]).returncode == 0
    wait_for(lambda: len(results(node.results_dir)) == 2, 120, "2 SRs")

    top_k = documented["postprocess"]["top_k"]
    with torch.inference_mode():
        direct = {d: float(network(slices[d]).softmax(1)[:, 1].topk(top_k).values.mean()) for d in SERIES}
    for description, finding in _finding_by_series(node.results_dir, demo_study).items():
        assert finding.finding.value == "27925004"
        assert finding.algorithm_name == "nodule-bundle"
        difference = abs(finding.probability - direct[description])
        print(f"2D {description}: node {finding.probability:.6f}, |node - network| {difference:.1e}")
        assert finding.probability == pytest.approx(direct[description], abs=1e-4)
        assert finding.present == SERIES[description]


# --- a 3D bundle on a volume pipeline, against MONAI running the bundle's own transforms ------------

VOLUME_METADATA = {
    "name": "Nodule classifier (3D)",
    "version": "1.0",
    "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": [48, 48, 8], "dtype": "float32"}},
        "outputs": {"pred": {"format": "classes", "num_channels": 2, "channel_def": {"0": "normal", "1": "nodule"}}},
    },
}
VOLUME_INFERENCE = {
    "network_def": {
        "_target_": "monai.networks.nets.densenet.DenseNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "init_features": 8,
        "growth_rate": 4,
        "block_config": [2, 2],
        "bn_size": 2,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {
                "_target_": "Orientationd",
                "keys": "image",
                "axcodes": "RAS",
                "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
            },
            {"_target_": "Spacingd", "keys": "image", "pixdim": [2.8, 2.8, 5.0], "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -1000,
                "a_max": 400,
                "b_min": -1,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "Resized", "keys": "image", "spatial_size": [48, 48, 8], "mode": "trilinear"},
        ],
    },
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
    },
}


def _monai_input(paths: list[Path]) -> torch.Tensor:
    """The series as MONAI holds it after LoadImage and EnsureChannelFirst (HU, stacked by
    plain pydicom, with its affine), put in RAS by hand (MONAI's Orientation needs nibabel,
    which radpipe does not install), then through the bundle's other transforms as MONAI
    itself builds and runs them."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    _, rows, columns = volume.shape
    lps = np.eye(4)  # index (slice, row, column) -> LPS mm: slices feet to head, rows to the back, columns to the left
    lps[:3, :3] = [[0, 0, PIXEL_SPACING_MM], [0, PIXEL_SPACING_MM, 0], [SLICE_THICKNESS_MM, 0, 0]]
    lps[:3, 3] = [float(v) for v in datasets[0].ImagePositionPatient]
    ras = np.array([[0, 0, 1, 0], [0, -1, 0, rows - 1], [-1, 0, 0, columns - 1], [0, 0, 0, 1]])  # RAS index -> SPL
    affine = LPS_TO_RAS @ lps @ ras
    assert (np.diag(affine)[:3] > 0).all() and np.count_nonzero(affine[:3, :3]) == 3  # axes run R, A, S
    oriented = np.ascontiguousarray(volume.transpose(2, 1, 0)[::-1, ::-1], dtype=np.float32)
    image = MetaTensor(torch.from_numpy(oriented)[None], affine=torch.from_numpy(affine))
    parser = ConfigParser(VOLUME_INFERENCE)
    for index in range(3, len(VOLUME_INFERENCE["preprocessing"]["transforms"])):  # after Orientationd
        image = parser.get_parsed_content(f"preprocessing::transforms::{index}")({"image": image})["image"]
    return image.as_tensor()[None]


def test_a_3d_bundle_serves_what_monai_computes_from_its_own_transforms(start_node, tmp_path, demo_study, dcmtk):
    inputs = {d: _monai_input(demo_study[d]) for d in SERIES}
    assert inputs[POSITIVE_DESCRIPTION].shape == (1, 1, 48, 48, 8)
    network = _trained(VOLUME_INFERENCE, torch.cat(list(inputs.values())), torch.tensor([1, 0]), steps=15)
    bundle = _write_bundle(tmp_path / "bundle", VOLUME_METADATA, VOLUME_INFERENCE, {"model": network.state_dict()})

    artifact = tmp_path / "models" / "volume-bundle"
    done = subprocess.run(
        [RADPIPE, "import", str(bundle), "--out", str(artifact)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    translated = yaml.safe_load(done.stdout.split("(for the pipeline YAML):\n", 1)[1])
    assert translated == {
        "input": {"kind": "volume", "orientation": "RAS", "spacing": [2.8, 2.8, 5]},
        "preprocess": [
            {"window": {"center": -300, "width": 1400}},
            {"rescale": {"slope": 2, "intercept": -1}},
            {"resize": [48, 48, 8]},
        ],
        "postprocess": {"activation": "softmax"},
    }
    assert "note" not in done.stdout  # every transform translated exactly

    pipeline = {
        "name": "volume-bundle",
        "version": 1,
        "match": {"Modality": "CT"},
        "completion": {"quiet_seconds": 1},
        **translated,
        "model": {"artifact": str(artifact), "device": "cpu"},
        "postprocess": {
            **translated["postprocess"],
            "findings": [{"label": "nodule", "code": ["SCT", "27925004", "Nodule"]}],
        },
        "destinations": [],
    }
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "volume-bundle.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    node = start_node()
    assert storescu(node.port, *demo_study[POSITIVE_DESCRIPTION], *demo_study[NEGATIVE_DESCRIPTION]).returncode == 0
    wait_for(lambda: len(results(node.results_dir)) == 2, 120, "2 SRs")

    with torch.inference_mode():
        direct = {d: float(network(inputs[d]).softmax(1)[0, 1]) for d in SERIES}
    for description, finding in _finding_by_series(node.results_dir, demo_study).items():
        difference = abs(finding.probability - direct[description])
        print(f"3D {description}: node {finding.probability:.6f}, |node - MONAI| {difference:.1e}")
        assert finding.probability == pytest.approx(direct[description], abs=1e-4)
        assert finding.present == SERIES[description]


# --- the translation, step by step against MONAI's own transforms ----------------------------------


def _in_memory(transforms_: list[dict]) -> Bundle:
    config = {"preprocessing": {"_target_": "Compose", "transforms": transforms_}}
    return Bundle(Path("bundle"), {}, config, Path("bundle/configs/inference.json"))


@pytest.mark.parametrize(
    ("shape", "transform", "steps"),
    [
        (
            (1, 9, 11),
            {"_target_": "ScaleIntensityRanged", "a_min": -1000, "a_max": 400, "b_min": 0, "b_max": 1, "clip": True},
            ["window"],
        ),
        (
            (1, 9, 11),
            {"_target_": "ScaleIntensityRange", "a_min": -1000, "a_max": 400, "b_min": -1, "b_max": 1, "clip": True},
            ["window", "rescale"],
        ),
        (
            (1, 9, 11),
            {"_target_": "ScaleIntensityRanged", "a_min": -1000, "a_max": 400, "b_min": 0, "b_max": 1},
            ["rescale"],
        ),
        ((1, 9, 11), {"_target_": "monai.transforms.ScaleIntensityRange", "a_min": -50, "a_max": 150}, ["rescale"]),
        ((1, 9, 11), {"_target_": "NormalizeIntensityd", "subtrahend": 100, "divisor": 40}, ["normalize"]),
        ((1, 9, 11), {"_target_": "NormalizeIntensityd"}, ["standardize"]),
        ((2, 5, 6, 7), {"_target_": "NormalizeIntensity", "channel_wise": True}, ["standardize"]),
        ((1, 10, 11), {"_target_": "CenterSpatialCropd", "roi_size": [5, 8]}, ["crop_or_pad"]),
        ((1, 10, 11), {"_target_": "SpatialPadd", "spatial_size": [13, 14]}, ["crop_or_pad"]),
        ((1, 6, 7, 11), {"_target_": "ResizeWithPadOrCropd", "spatial_size": [5, 10, 8]}, ["crop_or_pad"]),
        ((1, 6, 7, 11), {"_target_": "Resized", "spatial_size": [5, 9, 13], "mode": "trilinear"}, ["resize"]),
        ((1, 10, 11), {"_target_": "Resized", "spatial_size": [16, 20], "mode": "bilinear"}, ["resize"]),
    ],
    ids=lambda value: value["_target_"] if isinstance(value, dict) else None,
)
def test_a_translated_transform_does_what_monai_does(shape, transform, steps):
    image = torch.from_numpy(np.random.default_rng(0).uniform(-1200, 600, shape).astype(np.float32))
    translation = translate(_in_memory([transform]), len(shape) - 1)
    assert [next(iter(step)) for step in translation.preprocess] == steps
    ours = preprocess([PreprocessStep.model_validate(step) for step in translation.preprocess], image[None])[0]
    name = transform["_target_"].rpartition(".")[2].removesuffix("d")
    arguments = {key: value for key, value in transform.items() if key != "_target_"}
    theirs = getattr(transforms, name)(**arguments)(image)
    torch.testing.assert_close(ours, torch.as_tensor(theirs), rtol=1e-5, atol=1e-5)
    # a note where crop_or_pad would also pad or crop, and where a slice resize is exact only when it enlarges
    noted = name in ("CenterSpatialCrop", "SpatialPad") or (name == "Resize" and len(shape) == 3)
    assert len(translation.notes) == noted and not any(n.startswith("not translated") for n in translation.notes)


def test_what_does_not_map_is_listed_and_the_rest_translated():
    config = {
        "roi": [64, 64, 32],
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": ["image"], "reader": "ITKReader"},
                {"_target_": "EnsureChannelFirstd", "keys": ["image"]},
                {"_target_": "Orientationd", "keys": ["image"], "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": ["image"], "pixdim": 1.5, "mode": "nearest"},
                {"_target_": "CropForegroundd", "keys": ["image"], "source_key": "image"},
                {"_target_": "Lambdad", "keys": ["image"], "func": "$lambda x: x.flip(0)"},
                {"_target_": "NormalizeIntensityd", "keys": ["image"], "nonzero": True},
                "$@extra_transform",
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": "$monai.transforms.Compose([monai.transforms.Activations(sigmoid=True)])",
    }
    bundle = Bundle(Path("b"), {}, config, Path("b/configs/inference.json"))
    translation = translate(bundle, 3)
    assert translation.pipeline == {
        "input": {
            "kind": "volume",
            "orientation": "RAS",
            "sliding_window": {"roi_size": [64, 64, 32], "overlap": 0.5, "sw_batch_size": 4},
        }
    }
    assert translation.notes == [
        "not translated: preprocessing[3] Spacingd: mode='nearest'",
        "not translated: preprocessing[4] CropForegroundd: no pipeline key does what it does",
        "not translated: preprocessing[5] Lambdad: no pipeline key does what it does",
        "not translated: preprocessing[6] NormalizeIntensityd: nonzero=True",
        "not translated: preprocessing[7] '$@extra_transform': a Python expression",
        "inferer SlidingWindowInferer: each window gets its own class scores, and postprocess.aggregate joins them "
        "(MONAI blends windows)",
        "not translated: postprocessing: '$monai.transforms.Compose([monai.transforms.Activations...' "
        "is a Python expression",
    ]
    # the same transforms for a 2D model: no volume keys
    flat = translate(bundle, 2)
    assert flat.pipeline == {}
    assert flat.notes[:2] == [
        "not translated: preprocessing[2] Orientationd: radpipe resamples volumes only (input.kind: volume)",
        "not translated: preprocessing[3] Spacingd: radpipe resamples volumes only (input.kind: volume)",
    ]


@pytest.mark.parametrize(
    "target",
    [
        "DenseNet121",
        "monai.networks.nets.DenseNet121",
        "$monai.networks.nets.DenseNet121",
        "monai.networks.nets.densenet.DenseNet121",
    ],
)
def test_every_spelling_of_a_monai_network_is_one_registry_id(target):
    assert network_id(target, "network_def") == "monai.networks.nets.DenseNet121"


# --- refusals: one line, exit 1, nothing written, nothing run --------------------------------------

NETWORK = {
    "_target_": "DenseNet121",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,
    "init_features": 4,
    "growth_rate": 4,
    "block_config": [1, 1],
}
METADATA = {
    "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": [32, 32], "dtype": "float32"}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "normal", "1": "nodule"}}},
    }
}
BLOCKED = (
    "is outside monai.networks; radpipe builds only the networks monai.networks.nets exports, and runs nothing a "
    "bundle names"
)
DATA_ONLY = "is a Python expression; radpipe reads a bundle as data and runs none of it"


class _Marker:
    """Unpickling this creates the folder ``name`` (in the working directory)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.name,))


# marker -> the inference config that would create it, and the refusal after "radpipe import: CONFIG: "
RUNS_CODE = {
    "marker-os-system": (
        {"network_def": {"_target_": "os.system", "command": "mkdir marker-os-system"}},
        f"network_def: _target_ 'os.system' {BLOCKED}",
    ),
    "marker-expression": (
        {"network_def": {**NETWORK, "in_channels": "$__import__('os').mkdir('marker-expression') or 1"}},
        f"network_def.in_channels: \"$__import__('os').mkdir('marker-expression') or 1\" {DATA_ONLY}",
    ),
    "marker-reference": (
        {"network_def": "@evil", "evil": {"_target_": "os.mkdir", "path": "marker-reference"}},
        f"network_def: _target_ 'os.mkdir' {BLOCKED}",
    ),
    "marker-arg": (
        {"network_def": {**NETWORK, "in_channels": "@channels"}, "channels": "$__import__('os').mkdir('marker-arg')"},
        f"network_def.in_channels (@channels): \"$__import__('os').mkdir('marker-arg')\" {DATA_ONLY}",
    ),
}
# Builds each bundle's network_def as MONAI does (and reads the weights as torch.load did by
# default before torch 2.6), to show that every refused bundle would have run its payload.
_CONTROL = """
import sys, json, os, torch
from monai.bundle import ConfigParser
for folder in sys.argv[1:]:
    os.chdir(folder)
    try:
        torch.load("models/model.pt", weights_only=False)
        ConfigParser(json.load(open("configs/inference.json"))).get_parsed_content("network_def")
    except Exception:
        pass
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle per payload (each in its own folder, where its marker would appear), proven
    live in a subprocess, their markers then removed."""
    root = tmp_path_factory.mktemp("hostile")
    weights = ConfigParser({"n": NETWORK}).get_parsed_content("n").state_dict()
    for marker, (inference, _) in RUNS_CODE.items():
        _write_bundle(root / marker, METADATA, inference, weights)
    _write_bundle(root / "marker-weights", METADATA, {"network_def": NETWORK}, {"model": _Marker("marker-weights")})
    folders = sorted(str(p) for p in root.iterdir())
    subprocess.run([sys.executable, "-c", _CONTROL, *folders], check=True, timeout=120, capture_output=True)
    for folder in root.iterdir():
        assert (folder / folder.name).is_dir(), f"{folder.name}: the payload did not run when MONAI loaded it"
        (folder / folder.name).rmdir()
    return root


@pytest.mark.parametrize("marker", [*RUNS_CODE, "marker-weights"])
def test_a_bundle_that_would_run_code_is_refused(hostile, marker, tmp_path, monkeypatch, radpipe):
    bundle = hostile / marker
    monkeypatch.chdir(bundle)  # where the payload would create its marker
    code, out = radpipe("import", str(bundle), "--out", str(tmp_path / "out"))
    assert code == 1 and not (tmp_path / "out").exists()
    if marker == "marker-weights":
        assert out == (
            f"radpipe import: {bundle}/models/model.pt: holds a pickled posix.mkdir, not only tensors; radpipe reads "
            "weights as tensors alone (torch.load weights_only=True): save model.state_dict(), or safetensors\n"
        )
    else:
        assert out == f"radpipe import: {bundle}/configs/inference.json: {RUNS_CODE[marker][1]}\n"
    assert not (bundle / marker).exists()


@pytest.mark.parametrize(
    ("metadata", "network_def", "refusal"),
    [
        (
            METADATA,
            {"_target_": "monai.networks.nets.resnet18", "spatial_dims": 2, "n_input_channels": 1, "num_classes": 2},
            "CONFIG: network_def: _target_ 'monai.networks.nets.resnet18' is a function, not a torch.nn.Module "
            "class; radpipe builds network classes only",
        ),
        (
            METADATA,
            {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 2, "in_channels": 1, "out_channels": 2},
            "CONFIG: network_def: _target_ 'monai.networks.blocks.Convolution' is not a network that "
            "monai.networks.nets exports",
        ),
        (
            METADATA,
            {**NETWORK, "_target_": "$monai.networks.nets.DenseNet121(spatial_dims=2)"},
            "CONFIG: network_def: _target_ '$monai.networks.nets.DenseNet121(spatial_dims=2)' is a Python expression; "
            "radpipe builds only monai.networks.nets.<Name>",
        ),
        (
            METADATA,
            {**NETWORK, "block_config": "%configs/common.json::blocks"},
            "CONFIG: network_def.block_config: '%configs/common.json::blocks' is a macro (config from another file); "
            "radpipe reads a bundle as data and runs none of it",
        ),
        (
            {"name": "no format"},
            NETWORK,
            "METADATA: no network_data_format: radpipe takes the model's input shape and classes from it",
        ),
        (
            METADATA,
            {**NETWORK, "spatial_dims": 3},
            "CONFIG: network_def.spatial_dims is 3, but network_data_format's input has 2 spatial dimensions",
        ),
    ],
    ids=["function", "not-a-net", "expression-target", "macro", "no-network-data-format", "dimensions"],
)
def test_a_bundle_radpipe_cannot_build_is_refused(metadata, network_def, refusal, tmp_path, radpipe):
    bundle = _write_bundle(tmp_path / "bundle", metadata, {"network_def": network_def}, {})
    code, out = radpipe("import", str(bundle), "--out", str(tmp_path / "out"))
    assert code == 1 and not (tmp_path / "out").exists()
    where = {"CONFIG": f"{bundle}/configs/inference.json", "METADATA": f"{bundle}/configs/metadata.json"}
    assert out == f"radpipe import: {re.sub('CONFIG|METADATA', lambda m: where[m[0]], refusal, count=1)}\n"


def test_a_yaml_config_is_read_with_the_safe_loader(tmp_path, monkeypatch, radpipe):
    monkeypatch.chdir(tmp_path)
    weights = ConfigParser({"n": NETWORK}).get_parsed_content("n").state_dict()
    bundle = _write_bundle(tmp_path / "bundle", METADATA, {}, {"state_dict": weights})
    (bundle / "configs" / "inference.json").unlink()
    config = bundle / "configs" / "inference.yaml"
    config.write_text(yaml.safe_dump({"network_def": NETWORK}))
    code, out = radpipe("import", str(bundle), "--out", str(tmp_path / "out"))
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'out'}: module model, input 1x32x32"), out

    config.write_text("network_def: !!python/object/apply:os.mkdir [marker-yaml]\n")
    code, out = radpipe("import", str(bundle), "--out", str(tmp_path / "refused"))
    assert code == 1 and not (tmp_path / "refused").exists()
    [line] = out.splitlines()
    assert line.startswith(f"radpipe import: {config}: cannot read it: could not determine a constructor for the tag")
    assert not (tmp_path / "marker-yaml").exists()
    unsafe = "import sys, yaml; yaml.unsafe_load(open(sys.argv[1]))"  # what a loader that builds objects does
    subprocess.run([sys.executable, "-c", unsafe, str(config)], cwd=tmp_path, check=True, timeout=60)
    assert (tmp_path / "marker-yaml").is_dir()
