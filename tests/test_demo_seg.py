"""The segmentation demo: the phantom's truth, its geometry in the written series, and the
trained model's artifact and pipeline agreeing with what training fed it."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from scipy import ndimage

from plugin.demo import train_seg
from plugin.demo.phantom import LUNG_HU, make_volume, render_volume
from plugin.demo.series import SLICE_THICKNESS_MM, series_geometry, write_synthetic_study
from plugin.models.artifact import load_artifact, read_manifest
from plugin.pipeline import load_pipeline
from plugin.postprocess import ModelOutput
from plugin.preprocess import preprocess_volume
from plugin.segment import segment
from plugin.volume import Placement, Resampling, series_grid

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "lung-nodule-seg-demo.yaml"


def test_truth_costs_no_random_numbers():
    hu, labels = make_volume(np.random.default_rng(5), 12, 2)
    rendered = render_volume(np.random.default_rng(5), 12, 2)
    assert np.array_equal(hu, rendered.hu) and np.array_equal(labels, rendered.labels)


def test_the_mask_is_where_each_nodule_is_drawn():
    volume = render_volume(np.random.default_rng(1), 24, 3)
    for index, (*_, radius, hu) in enumerate(volume.nodules):
        drawn = volume.mask == index + 1
        # a sphere cut into 2.5 mm slices of 0.7 mm pixels, clipped only where the lungs or the volume end
        assert drawn.sum() * 0.7 * 0.7 * SLICE_THICKNESS_MM <= 1.1 * 4 / 3 * np.pi * radius**3
        # at least half nodule: nearer the nodule's HU than the lung's, give or take the noise
        assert (volume.hu[drawn] > (hu + LUNG_HU) / 2 - 60).mean() > 0.95


def test_truth_is_in_the_written_series_patient_coordinates(tmp_path):
    [positive, negative] = write_synthetic_study(tmp_path, seed=7, n_slices=10)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in positive.paths]
    assert np.allclose(series_grid(headers).affine, series_geometry(10).affine)
    for nodule, (x, y, z, radius, _) in zip(positive.nodules(), positive.volume.nodules, strict=True):
        centre = series_geometry(10).to_patient(np.array([[z / SLICE_THICKNESS_MM, y / 0.7 + 255.5, x / 0.7 + 255.5]]))
        assert np.linalg.norm(np.subtract(nodule.centroid, centre[0])) < radius
        assert nodule.diameter_mm == pytest.approx(2 * radius)
    assert negative.nodules() == []


def test_the_model_input_is_what_the_node_stacks_and_resamples(tmp_path):
    """Training resamples the phantom's array from series_geometry; the node stacks the files
    along their normal (feet first) and resamples from series_grid: the same tensor."""
    [series, _] = write_synthetic_study(tmp_path, seed=3, n_slices=8)
    pipeline = train_seg.read_pipeline(PIPELINE)
    trained, _, grid = train_seg.model_input(pipeline, series.volume)
    headers = sorted((pydicom.dcmread(p) for p in series.paths), key=lambda h: float(h.ImagePositionPatient[2]))
    resampling = Resampling(series_grid(headers), pipeline.input.orientation, pipeline.input.spacing)
    stack = torch.stack(
        [resampling.plane(torch.from_numpy(h.pixel_array.astype(np.float32))[None])[0] for h in headers]
    )
    served, served_grid = preprocess_volume(
        pipeline.preprocess, resampling.finish(stack)[None, None], resampling.target
    )
    assert torch.equal(trained, served)
    assert np.allclose(grid.affine, served_grid.affine)


def test_the_demo_pipeline_takes_synthetic_studies_only():
    match = yaml.safe_load(PIPELINE.read_text())["match"]
    assert (match["Manufacturer"], match["ManufacturerModelName"]) == ("radpipe", "radpipe phantom")


def test_the_committed_model_is_small_and_scored():
    pipeline = load_pipeline(PIPELINE)  # the artifact's task, classes and hashes checked
    folder = pipeline.artifact_dir
    manifest = read_manifest(folder)
    assert (folder / "weights.safetensors").stat().st_size < 5 << 20
    assert manifest["architecture"]["id"] == "monai.networks.nets.UNet"
    assert manifest["classes"] == train_seg.CLASSES
    scored = {"dice", "sensitivity", "false_positives_per_volume", "volume_within_15pct_5mm", "median_volume_error_5mm"}
    scored |= {"volumes_without_nodules", "volumes_without_nodules_with_a_lesion"}
    assert scored <= manifest["evaluation"].keys()
    window = pipeline.input.sliding_window
    assert window is not None
    assert [manifest["input"][k] for k in ("depth", "height", "width")] == list(window.roi_size)


def test_the_training_target_comes_back_as_the_drawn_volume():
    """A model that gave exactly its training target would be measured, once the node has put
    its probabilities back on the series and thresholded them halfway, at each nodule's drawn
    volume: the model's grid is fine enough for the smallest nodules the SR must measure (5 mm;
    on a 1.4 mm grid 3 in 16 of them came out more than 15 % off)."""
    pipeline = train_seg.read_pipeline(PIPELINE)
    unfiltered = {"min_volume_mm3": 0, "min_mean_probability": 0, "min_compactness": 0}
    unfiltered |= {"grow_threshold": None, "outline": None}  # the model's outline as drawn
    halfway = pipeline.postprocess.segments[0].model_copy(update={"threshold": 0.5, **unfiltered})
    postprocess = pipeline.postprocess.model_copy(update={"segments": [halfway]})
    for seed in range(3):
        volume = render_volume(np.random.default_rng(seed), 12, 3)
        case = train_seg.training_case(pipeline, volume)
        _, _, grid = train_seg.model_input(pipeline, volume)
        p = case.label.float()
        logits = torch.stack([torch.log1p(-p + 1e-6), torch.log(p + 1e-6)])[None]
        placement = Placement(series_geometry(*volume.hu.shape), grid, np.zeros((1, 3)))
        found = segment(postprocess, train_seg.CLASSES, ModelOutput(logits, placement))
        # each outlined voxel counts for the nodule drawn nearest to it (nodules may touch)
        nearest = ndimage.distance_transform_edt(volume.mask == 0, return_distances=False, return_indices=True)
        owner = volume.mask[tuple(nearest)]
        for index, radius in enumerate(volume.nodules[:, 3]):
            drawn = volume.mask == index + 1
            measured = (found.masks[0] & (owner == index + 1)).sum()
            print(f"{2 * radius:.1f} mm: {measured} voxels against {drawn.sum()} drawn")
            assert measured == pytest.approx(drawn.sum(), rel=0.1)


def test_per_nodule_tells_a_filters_miss_from_the_models(capsys):
    """``--per-nodule`` prints what the model gave each nodule before the lesion filters: a
    nodule that a filter dropped still shows the model's probabilities above the threshold."""
    pipeline = load_pipeline(PIPELINE)
    model = load_artifact(pipeline.artifact_dir, torch.device("cpu")).module
    # a tuning volume (never a held-out one) with 3 nodules, all found
    volume = train_seg.phantom_volumes(np.random.SeedSequence(1).spawn(2)[1], 3)[2]
    spec = pipeline.postprocess.segments[0]
    assert spec.outline is not None
    alone_too = spec.outline.model_copy(update={"alone": None})  # its lower score would let them through
    impossible = spec.model_copy(update={"min_mean_probability": 1.01, "outline": alone_too})
    postprocess = pipeline.postprocess.model_copy(update={"segments": [impossible]})
    strict = pipeline.model_copy(update={"postprocess": postprocess})
    for checked, found in ((pipeline, True), (strict, False)):
        scored = train_seg.evaluate(model, checked, [volume], per_nodule=True)
        rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
        assert len(rows) == len(volume.nodules) == 3
        assert scored["sensitivity"] == (1.0 if found else 0.0)
        for row in rows:
            assert ("not found" not in " ".join(row)) == found
            most, mean = float(row[-2]), float(row[-1])
            assert most >= spec.threshold and spec.threshold <= mean < 1.01


def test_a_volume_without_nodules_is_counted_when_any_lesion_is_reported():
    """``evaluate`` counts the volumes without nodules whose SR would say a nodule is
    present: the pipeline's filters keep this one clear, the model alone does not."""
    pipeline = load_pipeline(PIPELINE)
    model = load_artifact(pipeline.artifact_dir, torch.device("cpu")).module
    # a tuning volume without nodules (never a held-out one), with vessels seen end-on
    volume = train_seg.phantom_volumes(np.random.SeedSequence(1).spawn(2)[1], 4)[3]
    assert not len(volume.nodules)
    unfiltered = {"min_mean_probability": 0.0, "min_compactness": 0.0, "grow_threshold": None, "outline": None}
    threshold_only = pipeline.postprocess.segments[0].model_copy(update=unfiltered)
    model_alone = pipeline.model_copy(
        update={"postprocess": pipeline.postprocess.model_copy(update={"segments": [threshold_only]})}
    )
    for checked, flagged in ((pipeline, 0), (model_alone, 1)):
        scored = train_seg.evaluate(model, checked, [volume])
        assert (scored["volumes_without_nodules"], scored["volumes_without_nodules_with_a_lesion"]) == (1, flagged)
        assert (scored["false_positives_per_volume"] > 0) == bool(flagged)
