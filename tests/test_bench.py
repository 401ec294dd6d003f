"""``radpipe bench``'s baselines are judged on what the pipeline feeds the model: every int8
baseline is calibrated on the images ``radpipe optimize`` calibrated on, its AUC is
reported, and one that lost accuracy gets no speed ratio.

A recipe of 50 phantom slices (one chunk: no worker processes) and one batch size keep it
short; what is checked is where the baselines' data comes from and what the gate does
with them, not how fast anything runs.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.accel.bench import bench, bench_inputs
from plugin.accel.data import DataSets, load_data, phantom_split
from plugin.accel.optimize import optimize
from plugin.accel.recipe import Accept, Recipe
from plugin.demo.train import CLASSES, PREPROCESS
from plugin.models.artifact import read_manifest
from plugin.pipeline import load_pipeline
from tests.conftest import DEMO_ARTIFACT, write_pipeline

RECIPE = {
    "quantize": {"cpu": "int8_static", "buckets": [8]},
    "calibration": {"samples": 32},
    "data": {"train_samples": 50, "heldout_samples": 50, "seed": 1},
    "accept": {"max_auc_drop": 0.01, "max_per_class_auc_drop": 0.02},
}


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataSets]:
    """The demo model quantized by ``radpipe optimize`` on the recipe's data, and that data."""
    folder = tmp_path_factory.mktemp("bench")
    pipeline = load_pipeline(write_pipeline(folder, model={"artifact": str(DEMO_ARTIFACT), "optimize": RECIPE}))
    recipe = Recipe.model_validate(RECIPE)
    data = load_data(PREPROCESS, recipe.data, recipe.calibration, CLASSES, folder, workers=1)
    outcome = optimize(pipeline, recipe, folder / "lung-nodule-demo-int8", data=data)
    assert outcome.target is not None, outcome.failures
    return outcome.target, data


def test_bench_of_an_artifact_calibrates_its_baselines_on_what_optimize_calibrated_on(optimized):
    """Given the artifact alone (``radpipe bench DIR``), bench reads the artifact's recipe
    and preprocessing and makes the very images optimize calibrated on (the old path made
    32 slices of their seed, which are other slices than the first 32 of 50)."""
    artifact, made = optimized
    given = bench_inputs(DEMO_ARTIFACT, artifact, None, heldout=2, workers=1)
    assert torch.equal(given.data.calibration.images, made.calibration.images)
    recorded = read_manifest(artifact)["quantization"]["calibration"]["data"]
    assert (
        given.data.calibration.description
        == recorded
        == "first 32 training images (50 phantom slices (seed 1, stream 0))"
    )
    assert given.steps == PREPROCESS and given.findings == ["nodule"]
    assert given.accept == Recipe.model_validate(RECIPE).accept


def test_a_baseline_calibrated_on_what_the_pipeline_does_not_feed_gets_no_ratio(optimized, tmp_path):
    """ONNX Runtime's int8 calibrated on the slices without the pipeline's lung window
    (Hounsfield units, -1000 and more, where the model sees 0 to 1): its activation
    ranges are useless on real input."""
    artifact, made = optimized
    train_seed = np.random.SeedSequence(1).spawn(2)[0]
    unwindowed = phantom_split(PREPROCESS[1:], train_seed, 32, CLASSES, workers=1)
    data = DataSets(train=unwindowed, heldout=made.heldout, calibration=unwindowed)
    rows, summary = bench(DEMO_ARTIFACT, artifact, PREPROCESS, ["nodule"], data, [8], 0.02, tmp_path, Accept())
    auc = {row.variant: row.score for row in rows}
    assert auc["fp32 eager"] - auc["ORT int8 static"] > 0.01
    assert summary["AUC of ORT int8 static"] == round(auc["ORT int8 static"], 4)
    refused = summary["int8 / ORT int8 static (images/s)"]
    assert refused.startswith("no ratio: a baseline that lost accuracy: ORT int8 static: AUC ")
    assert "> max_auc_drop 0.01" in refused
    # the baselines that kept their accuracy keep their ratios
    assert set(summary["int8 / fp32 eager (images/s)"]) == set(summary["int8 / ORT fp32 (images/s)"]) == {"batch 8"}
