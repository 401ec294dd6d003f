"""``radpipe replay``: a pipeline's rules judged over what a real node received and journaled."""

import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pydicom
import yaml

from plugin.app import Node
from tests.conftest import PYDICOM_FILES, storescu, write_pipeline

DEMO_MATCH = {"Modality": "CT", "Manufacturer": "radpipe", "ManufacturerModelName": "radpipe phantom"}
_TAKEN = re.compile(r"^  study (\S+)  series (\S+)  (\d+) instance\(s\)$")
_REFUSED = re.compile(r"^ +(\d+)  (.+)$")
_RAN = re.compile(r"^  job #\d+ (\w+)  study (\S+)  series (\S+): sr (\S+)$")


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID


def _parse(out: str) -> tuple[set[tuple[str, str, int]], Counter[str]]:
    """The series a replay would take (study, series, instances), and its refusals per reason."""
    lines = out.splitlines()
    split = next(i for i, line in enumerate(lines) if line.startswith("would not take"))
    taken = {(m[1], m[2], int(m[3])) for line in lines[:split] if (m := _TAKEN.match(line))}
    refused: Counter[str] = Counter({m[2]: int(m[1]) for line in lines[split + 1 :] if (m := _REFUSED.match(line))})
    assert int(lines[split].split()[3]) == sum(refused.values())
    return taken, refused


def test_replay_over_a_received_journal(
    tmp_path: Path, start_node: Callable[..., Node], radpipe: Callable[..., tuple[int, str]], dcmtk: None
) -> None:
    from plugin.demo.series import write_synthetic_study

    # The node's own pipeline takes nothing, so it only stores and journals: replay must not
    # depend on what the node ran.
    write_pipeline(tmp_path / "pipelines", name="nothing", match={"Modality": "XX"})
    node = start_node()
    study_a = write_synthetic_study(tmp_path / "a", seed=1, n_slices=4)
    study_b = write_synthetic_study(tmp_path / "b", seed=2, n_slices=4)
    ct, mr, dose = PYDICOM_FILES / "CT_small.dcm", PYDICOM_FILES / "MR_small.dcm", PYDICOM_FILES / "rtdose.dcm"
    old = [*study_a[0].paths, *study_a[1].paths, ct, mr]
    new = [*study_b[0].paths, dose]
    assert storescu(node.port, *old).returncode == 0
    time.sleep(4)
    assert storescu(node.port, *new).returncode == 0

    config = tmp_path / "radpipe.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"dir": str(tmp_path / "data")}, "journal": {"url": node.config.journal.url}})
    )
    pipelines = tmp_path / "replay"

    def replay(pipeline: Path, *options: str) -> tuple[set[tuple[str, str, int]], Counter[str]]:
        code, out = radpipe("replay", str(pipeline), "--config", str(config), *options)
        assert code == 0, out
        for path in (ct, mr, dose):  # UIDs only: never a patient's name or ID
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert str(ds.PatientName) not in out and ds.PatientID not in out
        return _parse(out)

    since_sent = replay(write_pipeline(pipelines, name="demo-recent"), "--since", "3s")
    synthetic = {(*_uids(s.paths[0]), 4) for s in (*study_a, study_b[0])}
    assert since_sent == (
        {(*_uids(study_b[0].paths[0]), 4)},
        Counter({"Modality == 'CT' failed (actual: RTDOSE)": 1}),
    )

    assert replay(write_pipeline(pipelines)) == (
        synthetic,
        Counter(
            {
                "Modality == 'CT' failed (actual: MR)": 1,
                "Modality == 'CT' failed (actual: RTDOSE)": 1,
                "Manufacturer == 'radpipe' failed (actual: GE MEDICAL SYSTEMS)": 1,
            }
        ),
    )

    # --run: the node's runner on the spool's files, results kept in --out, the node's journal untouched.
    out = tmp_path / "out"
    code, ran = radpipe("replay", str(write_pipeline(pipelines)), "--config", str(config), "--run", "--out", str(out))
    assert code == 0, ran
    jobs = [m.groups() for line in ran.splitlines() if (m := _RAN.match(line))]
    assert {(status, study, series) for status, study, series, _ in jobs} == {
        ("done", study, series) for study, series, _ in synthetic
    }
    for _, study, series, path in jobs:
        evidence = pydicom.dcmread(out / path).CurrentRequestedProcedureEvidenceSequence[0]
        assert (evidence.StudyInstanceUID, evidence.ReferencedSeriesSequence[0].SeriesInstanceUID) == (study, series)
    assert node.journal.jobs() == []
    assert radpipe("replay", str(write_pipeline(pipelines)), "--config", str(config), "--run", "--out", str(out)) == (
        1,
        f"{out} holds an earlier run: choose another --out\n",
    )

    not_synthetic = write_pipeline(
        pipelines, name="real-ct-mr", match={"Modality": {"in": ["CT", "MR"]}, "not": {"Manufacturer": "radpipe"}}
    )
    assert replay(not_synthetic) == (
        {(*_uids(ct), 1), (*_uids(mr), 1)},
        Counter({"`not` block held": 3, "Modality in ['CT', 'MR'] failed (actual: RTDOSE)": 1}),
    )

    # Study level: study A holds 8 instances, study B's series only 4; MR and CT are refused on match first.
    whole_studies = write_pipeline(
        pipelines,
        name="demo-studies",
        match=DEMO_MATCH,
        completion={"level": "study", "quiet_seconds": 1, "min_instances": 5},
    )
    assert replay(whole_studies) == (
        {(*_uids(s.paths[0]), 4) for s in study_a},
        Counter(
            {
                "completion: 4 instance(s) in the study < min_instances 5": 1,
                "Modality == 'CT' failed (actual: MR)": 1,
                "Modality == 'CT' failed (actual: RTDOSE)": 1,
                "Manufacturer == 'radpipe' failed (actual: GE MEDICAL SYSTEMS)": 1,
            }
        ),
    )


def test_replay_refuses_a_bad_pipeline_and_a_missing_journal(
    tmp_path: Path, radpipe: Callable[..., tuple[int, str]]
) -> None:
    bad = write_pipeline(tmp_path / "pipelines", match={"Modality": {"regex": "("}})
    code, validated = radpipe("validate", str(bad))
    assert code == 1 and f"{bad}:" in validated
    assert radpipe("replay", str(bad)) == (1, validated)

    config = tmp_path / "radpipe.yaml"
    config.write_text(yaml.safe_dump({"storage": {"dir": str(tmp_path / "empty")}}))
    code, out = radpipe("replay", str(write_pipeline(tmp_path / "good")), "--config", str(config))
    missing = tmp_path / "empty" / "journal.sqlite"
    assert (code, out) == (1, f"no journal at {missing}: has the node run with this config?\n")

    code, out = radpipe("replay", str(write_pipeline(tmp_path / "good")), "--since", "a week")
    assert code == 1 and out.startswith("--since: ")
