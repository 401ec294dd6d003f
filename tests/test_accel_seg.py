"""radpipe optimize on a segmentation model: the demo's 3D UNet pruned (Conv3d,
ConvTranspose3d, residual units, skip concatenations), fine-tuned on phantom windows, gated
on the Dice of the lesions the node would report, written only when it passes and served
by the node's loader; int8 and classification keys refused in one line.

Kept small (the whole file well under two minutes on two cores): volumes of 24 slices
cropped to 160 x 160 around a nodule, a few windows, a step or two of fine-tuning.
"""

import dataclasses
import re

import numpy as np
import pytest
import torch
import yaml

from plugin.accel.optimize import optimize
from plugin.accel.recipe import Recipe, task_problem
from plugin.accel.volumes import VolumeSets, training_windows
from plugin.demo import train_seg
from plugin.demo.phantom import PhantomVolume, render_volume
from plugin.models.artifact import load_artifact, read_manifest
from plugin.pipeline import Pipeline, load_pipeline
from tests.conftest import REPO, write_pipeline

SEG_PIPELINE = REPO / "pipelines" / "lung-nodule-seg-demo.yaml"
_SIDE = 160  # pixels kept around the first nodule: four windows per slab instead of 49


def _cropped(volume: PhantomVolume) -> PhantomVolume:
    """``volume`` as a smaller series: rows and columns around its first nodule."""
    _, row, column = np.argwhere(volume.mask == 1).mean(0).astype(int)
    top, left = (int(np.clip(c - _SIDE // 2, 0, volume.hu.shape[1] - _SIDE)) for c in (row, column))
    keep = (slice(None), slice(top, top + _SIDE), slice(left, left + _SIDE))
    return dataclasses.replace(volume, hu=volume.hu[keep].copy(), mask=volume.mask[keep].copy())


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return load_pipeline(SEG_PIPELINE)


@pytest.fixture(scope="module")
def volumes(pipeline: Pipeline) -> VolumeSets:
    rendered = [_cropped(render_volume(np.random.default_rng(seed), 24, 1 + seed % 2)) for seed in range(4)]
    train = training_windows(pipeline, rendered[:2], 8, seed=1)
    return VolumeSets(train, train, rendered[2:], "2 cropped phantom volumes")


def _recipe(**changes: object) -> Recipe:
    recipe: dict[str, object] = {
        "prune": {"ratio": 0.25, "round_to": 2, "iterative_steps": 1, "finetune_epochs": 0.5},
        "quantize": {"cpu": "none"},
        "finetune": {"batch_size": 2, "lr": 1e-4},
        "accept": {"max_dice_drop": 1.0},  # behaviour under test, not accuracy (a 0.5-epoch tune)
    }
    return Recipe.model_validate({**recipe, **changes})


def test_a_pruned_segmentation_model_that_passes_the_dice_gate_is_written_and_served(tmp_path, pipeline, volumes):
    outcome = optimize(pipeline, _recipe(), tmp_path / "pruned", data=volumes)
    assert outcome.target == tmp_path / "pruned" and not outcome.failures
    manifest = read_manifest(outcome.target)
    evaluation = manifest["evaluation"]
    assert evaluation["accept"] == {"max_dice_drop": 1.0}
    assert evaluation["original"]["dice"] > 0.1  # the trained model finds the nodules it is scored on
    assert set(evaluation["variants"]) == {"pruned fp32", "served pruned (fp32, cpu)"}
    assert all("dice_drop" in v for v in evaluation["variants"].values())
    assert manifest["complexity"]["after"]["params"] < manifest["complexity"]["before"]["params"]
    assert "gpu" not in manifest  # that variant compiles 2D channels_last only

    served = load_artifact(outcome.target, torch.device("cpu"))  # the node's loader
    original = load_artifact(pipeline.artifact_dir, torch.device("cpu"))

    def channels(model: torch.nn.Module) -> int:
        return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv3d))

    assert channels(served.module) < channels(original.module)  # channels really went
    windows = volumes.train.images[:3]
    with torch.inference_mode():
        logits = served.module(windows)
    assert logits.shape == (3, 2, *windows.shape[2:])  # one logit per class and voxel


def test_the_demos_evaluate_scores_a_pruned_artifact_without_recording(tmp_path, pipeline, volumes, monkeypatch):
    """`python -m plugin.demo.train_seg --evaluate --out DIR` on what optimize wrote: its
    manifest has no training record (it raised KeyError: 'training'); scored, not rewritten."""
    outcome = optimize(pipeline, _recipe(), tmp_path / "pruned", data=volumes)
    manifest = (outcome.target / "manifest.json").read_bytes()
    monkeypatch.setattr(train_seg, "phantom_volumes", lambda seed, n: volumes.heldout[:n])
    scored = train_seg.rescore(outcome.target, SEG_PIPELINE, seed=1, n_val=1)
    assert 0.0 <= scored["dice"] <= 1.0 and scored["n_heldout"] == 1
    assert (outcome.target / "manifest.json").read_bytes() == manifest


def test_a_result_that_fails_the_dice_gate_writes_nothing(tmp_path, pipeline, volumes):
    recipe = _recipe(
        prune={"ratio": 0.9, "round_to": 1, "iterative_steps": 1, "finetune_epochs": 0}, accept={"max_dice_drop": 0.0}
    )
    outcome = optimize(pipeline, recipe, tmp_path / "pruned", data=volumes)
    assert outcome.target is None and not (tmp_path / "pruned").exists()
    assert any("> max_dice_drop 0.0" in failure for failure in outcome.failures)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"quantize": {"cpu": "none"}, "accept": {"max_auc_drop": 0.01}},
            "accept.max_auc_drop is a classification key; a segmentation model's recipe takes accept.max_dice_drop",
        ),
        (
            {"quantize": {"cpu": "none"}, "data": {"train_samples": 100}},
            "data.train_samples is a classification key",
        ),
        (
            {"quantize": {"cpu": "int8_static"}},
            "quantize.cpu int8_static: torchao's x86 int8 quantizer takes Conv1d/Conv2d/Linear layers and this model "
            "has only Conv3d/ConvTranspose3d, so nothing would run in int8; set quantize.cpu: none",
        ),
    ],
)
def test_what_does_not_apply_to_a_segmentation_model_is_refused_in_one_line(tmp_path, radpipe, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"optimize": recipe}))
    code, out = radpipe("optimize", str(write_pipeline(tmp_path, SEG_PIPELINE)), "--recipe", str(path))
    assert code == 2 and message in out and out.strip().count("\n") == 0


def test_validate_refuses_a_pipeline_whose_recipe_is_the_other_tasks(tmp_path, radpipe):
    """A recipe in the pipeline (model.optimize) is checked when the pipeline is read, at its line."""
    model = yaml.safe_load(SEG_PIPELINE.read_text())["model"]
    model["artifact"] = str(SEG_PIPELINE.parent / model["artifact"])
    model["optimize"] = {"quantize": {"cpu": "none"}, "accept": {"max_auc_drop": 0.01}}
    path = write_pipeline(tmp_path, SEG_PIPELINE, model=model)
    code, out = radpipe("validate", str(path))
    assert code == 1
    assert "model.optimize: accept.max_auc_drop is a classification key; a segmentation model's recipe takes" in out


def test_the_documented_segmentation_recipe_fits_a_segmentation_model():
    blocks = re.findall(r"```yaml\n(optimize:.*?)```", (REPO / "pipelines" / "README.md").read_text(), re.S)
    [block] = [b for b in blocks if "max_dice_drop" in b]
    recipe = Recipe.model_validate(yaml.safe_load(block)["optimize"])
    assert task_problem(recipe, "segmentation") is None and task_problem(recipe, "classification") is not None
