"""Shadow runs: a candidate pipeline runs on live traffic after the live one, its results kept
and journaled but never sent; its agreement with the live one is exported and compared."""

import re
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom import Dataset

from plugin.app import Node
from plugin.demo.series import write_synthetic_study
from plugin.journal import FindingPair, JobSpec, PendingSeries
from plugin.outputs.sr import ReportedFinding, read_measurement_report
from plugin.pipeline import PipelineError, load_pipeline_files
from plugin.router import Router
from tests.conftest import DEMO_PIPELINE, open_journal, storescu, wait_for, write_pipeline
from tests.test_monitoring import http_get, metrics_url

LIVE, SHADOW = "lung-nodule-demo", "lung-nodule-shadow"
# The same model with a lower threshold than the live 0.8: the two disagree exactly on the
# series scored between the thresholds (hard negatives with vessels, faint nodules).
SHADOW_THRESHOLD = 0.3
_DISAGREEMENT = re.compile(r"^  nodule  live (\w+) \S+  shadow (\w+) \S+  study (\S+)  series (\S+)$")


def write_shadow(directory: Path, **changes: object) -> Path:
    """The demo pipeline as a shadow of itself, at a lower finding threshold."""
    postprocess = yaml.safe_load(DEMO_PIPELINE.read_text())["postprocess"]
    postprocess["findings"][0]["threshold"] = SHADOW_THRESHOLD
    keys = {"name": SHADOW, "mode": "shadow", "shadow_of": LIVE, "postprocess": postprocess, **changes}
    return write_pipeline(directory, **keys)


def reported(paths: list[str]) -> dict[str, ReportedFinding]:
    """Each SR's one finding, by the SOP Instance UID of its first source image."""
    findings = {}
    for path in paths:
        [finding] = read_measurement_report(pydicom.dcmread(path))
        findings[finding.source_sop_instance_uids[0]] = finding
    return findings


def test_a_shadow_is_never_sent_and_compare_reports_its_agreement(
    tmp_path: Path,
    start_node: Callable[..., Node],
    radpipe: Callable[..., tuple[int, str]],
    storescp: tuple[int, Path],
) -> None:
    port, pacs_dir = storescp  # dcmtk's storescp as the destination
    write_pipeline(tmp_path / "pipelines", destinations=["pacs"])
    write_shadow(tmp_path / "pipelines", destinations=["pacs"])  # never sent there all the same
    studies = [write_synthetic_study(tmp_path / f"s{seed}", seed, n_slices=16) for seed in range(3)]
    sent = [path for study in studies for series in study for path in series.paths]
    node = start_node(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}})
    assert storescu(node.port, *sent).returncode == 0
    n_series = 2 * len(studies)

    def finished() -> list:
        jobs = node.journal.jobs()
        return jobs if len(jobs) == 2 * n_series and all(j.status == "done" for j in jobs) else []

    jobs = wait_for(finished, timeout=60, what="both pipelines' jobs done")
    wait_for(lambda: len(list(pacs_dir.iterdir())) >= n_series, what="the live SRs at the PACS")
    live_jobs = {j.batch_id: j for j in jobs if j.pipeline == LIVE}
    shadow_jobs = {j.batch_id: j for j in jobs if j.pipeline == SHADOW}
    assert live_jobs.keys() == shadow_jobs.keys() and len(live_jobs) == n_series
    for batch, shadow_job in shadow_jobs.items():  # on the same series, after the live job
        assert shadow_job.priority < live_jobs[batch].priority
        assert shadow_job.started_at >= live_jobs[batch].finished_at
    live_srs = {r.sop_instance_uid: r.path for j in live_jobs.values() for r in node.journal.results(j.id)}
    shadow_srs = {r.sop_instance_uid: r.path for j in shadow_jobs.values() for r in node.journal.results(j.id)}
    assert len(live_srs) == len(shadow_srs) == n_series
    assert all(Path(p).is_file() and Path(p).is_relative_to(node.results_dir) for p in shadow_srs.values())
    assert all(node.journal.deliveries(j.id) == [] for j in shadow_jobs.values())
    wait_for(lambda: all(d.status == "delivered" for j in live_jobs.values() for d in node.journal.deliveries(j.id)))
    received = [pydicom.dcmread(path, stop_before_pixels=True) for path in pacs_dir.iterdir()]
    assert sorted(ds.SOPInstanceUID for ds in received) == sorted(live_srs)  # exactly the live results

    # What the two pipelines reported, read back from their SRs and paired by series.
    headers = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sent)}
    live, shadow = reported(list(live_srs.values())), reported(list(shadow_srs.values()))
    assert live.keys() == shadow.keys()
    assert all(f.algorithm_name == SHADOW for f in shadow.values())
    pairs = [(live[uid], shadow[uid], headers[uid]) for uid in live]
    disagreements = {
        (str(h.StudyInstanceUID), str(h.SeriesInstanceUID), lf.present, sf.present)
        for lf, sf, h in pairs
        if lf.present != sf.present
    }
    agree = n_series - len(disagreements)
    true_positive = sum(lf.present and sf.present for lf, sf, _ in pairs)
    positives = sum(lf.present for lf, _, _ in pairs)
    true_negative = sum(not lf.present and not sf.present for lf, sf, _ in pairs)
    print(f"agree {agree}/{n_series}; live positives {positives}; disagreements {disagreements}")
    assert 0 < len(disagreements) < n_series and 0 < positives < n_series  # both kinds, or nothing is tested

    # The metrics the node exports say the same.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(http_get(metrics_url(node)).decode())
        for s in family.samples
    }
    labels = {"pipeline": SHADOW, "live": LIVE, "finding": "nodule", "node": node.config.node.id}

    def sample(name: str, **more: str) -> float:
        return samples[(name, tuple(sorted({**labels, **more}.items())))]

    assert sample("radpipe_shadow_agreement_total", agreement="agree") == agree
    assert sample("radpipe_shadow_agreement_total", agreement="disagree") == len(disagreements)
    differences = [sf.probability - lf.probability for lf, sf, _ in pairs]
    # (a histogram with negative buckets has no _sum: its buckets tell the differences)
    buckets = {dict(key[1])["le"]: v for key, v in samples.items() if key[0].endswith("difference_bucket")}
    assert buckets and all(v == sum(d <= float(le) for d in differences) for le, v in buckets.items())

    # And so does `radpipe compare`, by UID and with no patient's name or ID.
    config = tmp_path / "radpipe.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"dir": str(tmp_path / "data")}, "journal": {"url": node.config.journal.url}})
    )
    code, out = radpipe("compare", LIVE, SHADOW, "--since", "1h", "--config", str(config))
    print(out)
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["finding"])
    row = lines[header + 1].split()
    share = [f"{x:.1%}" for x in (agree / n_series, true_positive / positives, true_negative / (n_series - positives))]
    assert row == [
        "nodule",
        str(n_series),
        str(agree),
        str(len(disagreements)),
        *share,
        f"{sum(differences) / n_series:+.3f}",
    ]
    printed = {
        (m[3], m[4], m[1] == "present", m[2] == "present")
        for line in out.splitlines()
        if (m := _DISAGREEMENT.match(line))
    }
    assert printed == disagreements
    identities = {str(v) for h in headers.values() for v in (h.PatientName, h.PatientID) if str(v)}
    assert identities and not any(identity in out for identity in identities)


def test_a_shadow_must_name_a_live_pipeline_it_can_follow(tmp_path: Path) -> None:
    live = write_pipeline(tmp_path / "live")

    def errors(**changes: object) -> str:
        shadow = write_shadow(tmp_path / "shadow", **changes)
        with pytest.raises(PipelineError) as raised:
            load_pipeline_files([live, shadow], set())
        return str(raised.value)

    assert f"{SHADOW}.yaml:" in errors(shadow_of=None)
    assert "mode: a shadow names the live pipeline it shadows" in errors(shadow_of=None)
    assert "shadow_of: no live pipeline 'lung-nodule-other' is loaded with it" in errors(shadow_of="lung-nodule-other")
    assert f"priority: a shadow runs after its live pipeline: set it below 0 ({LIVE}'s)" in errors(priority=0)
    completion = {"level": "study", "quiet_seconds": 1}
    assert f"completion.level: 'study' differs from 'series' of the live pipeline {LIVE}" in errors(
        completion=completion
    )
    assert "shadow_of: only a pipeline with mode: shadow shadows another" in errors(mode="live")
    shadow = write_shadow(tmp_path / "shadow")
    assert [(p.name, p.priority, p.destinations_in(["pacs"])) for p in load_pipeline_files([live, shadow], set())] == [
        (LIVE, 0, ["pacs"]),
        (SHADOW, -100, []),
    ]


def test_a_shadow_takes_only_what_its_live_pipeline_takes(tmp_path: Path) -> None:
    live = write_pipeline(tmp_path / "live")
    shadow = write_shadow(tmp_path / "shadow", match={"Modality": "CT"})  # wider than the live one's
    router = Router(load_pipeline_files([live, shadow], set()))
    header = Dataset()
    header.Modality, header.Manufacturer, header.ManufacturerModelName = "CT", "radpipe", "radpipe phantom"
    assert [p.name for p in router.matching(header)] == [LIVE, SHADOW]
    header.Manufacturer = "ACME"
    assert {v.pipeline.name: v.failure for v in router.explain(header)}[
        SHADOW
    ] == f"shadows {LIVE}, which does not take it"
    assert router.matching(header) == []


def test_finding_pairs_follow_the_journal(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    # No instance journaled: the series closes with the 0 pending instances it counts.
    series = PendingSeries("1.2.3", "1.2.3.4", 0, 0.0, 0.0, "x.dcm")
    journal.create_batches(
        "1.2.3", [(series, [JobSpec(LIVE, "1", "a" * 64, 0), JobSpec(SHADOW, "1", "b" * 64, -100)])], []
    )
    live_job = journal.claim_job()
    assert live_job is not None and journal.claim_job() is None  # the shadow's waits for the live one
    journal.complete_job(live_job.id, [], [], [("nodule", 0.6, False)])
    shadow_job = journal.claim_job()
    assert shadow_job is not None and shadow_job.pipeline == SHADOW
    assert journal.finding_pairs(LIVE, SHADOW) == []  # the shadow job has not finished
    journal.complete_job(shadow_job.id, [], [], [("nodule", 0.6, True)])
    pair = FindingPair("1.2.3", "1.2.3.4", "nodule", 0.6, False, 0.6, True)
    assert (
        journal.finding_pairs(LIVE, SHADOW) == journal.finding_pairs(LIVE, SHADOW, shadow_job=shadow_job.id) == [pair]
    )
    assert journal.finding_pairs(LIVE, SHADOW, since=time.time() + 60) == []
    journal.forget_study("1.2.3")
    assert journal.finding_pairs(LIVE, SHADOW) == []
    journal.close()
