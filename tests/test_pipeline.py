"""Pipeline files: load -> dump -> load round trip, and errors that name the file and key."""

import pydicom
import pytest
import yaml

from plugin.pipeline import PipelineError, load_pipeline, load_pipelines
from tests.conftest import DEID_HUMANS, DEMO_PIPELINE, PYDICOM_FILES, write_pipeline


def test_load_dump_load_round_trip(tmp_path):
    original = load_pipeline(DEMO_PIPELINE)
    dumped = original.model_dump(mode="json", exclude_none=True)
    dumped["model"]["artifact"] = str(original.artifact_dir)
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump(dumped))
    again = load_pipeline(tmp_path / "copy.yaml")
    assert again.model_dump(exclude={"model"}) == original.model_dump(exclude={"model"})
    assert again.artifact_dir == original.artifact_dir


def test_demo_pipeline_matches_ct_not_mr():
    pipeline = load_pipeline(DEMO_PIPELINE)
    ct = pydicom.dcmread(DEID_HUMANS / "ctbrain1.dcm", stop_before_pixels=True)
    mr = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm", stop_before_pixels=True)
    assert all(c.holds(ct) for c in pipeline.conditions)
    assert not all(c.holds(mr) for c in pipeline.conditions)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"match": {"Modalty": "CT"}}, "match: Value error, unknown DICOM keyword 'Modalty'"),
        ({"match": {"SeriesDescription": {"regex": "("}}}, "match: Value error, SeriesDescription: invalid regex"),
        ({"match": {"Modality": {"in": []}}}, "match: Value error, Modality: 'in' needs a non-empty list"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"preprocess": [{"window": {"center": 0, "width": 1}, "resize": [2, 2]}]}, "exactly one step"),
        ({"model": {"artifact": "nowhere"}}, "model.artifact: no manifest.json"),
        ({"destinations": ["pacs"]}, "destinations: unknown destination 'pacs'"),
    ],
)
def test_errors_name_file_and_key(tmp_path, changes, message):
    path = write_pipeline(tmp_path / "pipelines", **changes)
    with pytest.raises(PipelineError) as error:
        load_pipelines(tmp_path / "pipelines", destinations=set())
    assert str(error.value).startswith(f"{path}: ") or f"\n{path}: " in str(error.value)
    assert message in str(error.value)


def test_python_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(PipelineError, match="could not determine a constructor"):
        load_pipeline(path)
