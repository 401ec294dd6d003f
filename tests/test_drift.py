"""Model drift, end to end: a real node scores baseline-like series and then series as a
miscalibrated scanner would send them; what it exports moves, and the shipped drift alerts,
fed by promtool with the node's own scraped values, fire for the shifted traffic only.

The shift: the same synthetic chest CT written with Rescale Intercept -1024 (pixels read
1024 HU too dark, a known export error) and every second slice (5 mm instead of 2.5 mm).
"""

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from plugin.app import Node
from plugin.demo.phantom import PIXEL_SPACING_MM
from plugin.demo.series import write_synthetic_study
from plugin.metrics import NODE_LABEL, Band
from plugin.pipeline import PipelineError, load_pipeline
from tests.conftest import DEMO_ARTIFACT, REPO, results, storescu, wait_for, write_pipeline
from tests.test_monitoring import PROMETHEUS, http_get, metrics_url, tool

PIPELINE = "lung-nodule-demo"
NODULE = {"pipeline": PIPELINE, "finding": "nodule"}
# What the demo model gives on its synthetic studies (half of them with nodules), as a
# validation would state it in the pipeline file.
BAND = {"positive_rate": [0.3, 0.7], "mean_score": [0.45, 0.8]}
BAND_ALERTS = ("RadpipePositiveRateOutOfBand", "RadpipeMeanScoreOutOfBand")
MONITORED = ("radpipe_series_", "radpipe_finding", "radpipe_input_")
STEP, DAY = "10m", 144  # promtool's sample and evaluation interval, and a day of them
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: Node) -> Samples:
    """The node's model monitoring metrics (scores, verdicts, inputs, bands) from ``/metrics``,
    by their labels less ``node`` (the one node's id, on every sample it serves)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(http_get(metrics_url(node)).decode()):
        if family.name.startswith(MONITORED):
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    labels = sorted((k, v) for k, v in sample.labels.items() if k != NODE_LABEL)
                    samples[(sample.name, tuple(labels))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scored(node: Node) -> float:
    """Series the node has scored for the finding (none yet: the histogram has no series)."""
    return scrape(node).get(("radpipe_series_score_count", tuple(sorted(NODULE.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0.0)


def input_series(instance: str, stretches: list[tuple[Samples, Samples, int]], bands: bool) -> list[dict[str, str]]:
    """promtool input series of an instance whose traffic every 10 minutes is what the node
    counted between two scrapes, for each stretch of that many steps in turn; the bands
    hold their scraped value (or are left out: a pipeline without a band)."""
    total = sum(steps for *_, steps in stretches)
    series = []
    for key, scraped in sorted(stretches[-1][1].items()):
        name, labels = key
        if name == "radpipe_finding_baseline":
            if not bands:
                continue
            values = f"{scraped}x{total}"
        else:
            parts, level = [], 0.0
            for i, (before, after, steps) in enumerate(stretches):
                step = after.get(key, 0.0) - before.get(key, 0.0)
                start, count = (0.0, steps) if i == 0 else (level + step, steps - 1)
                parts.append(f"{start:.9f}+{step:.9f}x{count}")
                level = start + step * count
            values = " ".join(parts)
        matchers = ", ".join(f"{k}={json.dumps(v)}" for k, v in (("job", "radpipe"), ("instance", instance), *labels))
        series.append({"series": f"{name}{{{matchers}}}", "values": values})
    return series


def sr_probabilities(paths: list[Path]) -> list[float]:
    """Every probability (DCM 122157) the SRs report."""

    def walk(items: pydicom.Sequence) -> list[float]:
        found = []
        for item in items:
            if item.ConceptNameCodeSequence[0].CodeValue == "122157":
                found.append(float(item.MeasuredValueSequence[0].NumericValue))
            found += walk(item.get("ContentSequence", []))
        return found

    return [p for path in paths for p in walk(pydicom.dcmread(path).ContentSequence)]


def miscalibrated(paths: list[Path], out_dir: Path) -> list[Path]:
    """Every second slice of a series, with Rescale Intercept -1024, as a new study."""
    study, series = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True)
    copies = []
    for path in paths[::2]:
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept = "-1024"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out_dir / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(copies[-1])
    return copies


def promtool_test(tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "drift_test.yml"
    rules = [str(PROMETHEUS / "alerts.yml")]
    path.write_text(yaml.safe_dump({"rule_files": rules, "evaluation_interval": STEP, "tests": tests}))
    return subprocess.run(
        [tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


def test_shifted_inputs_move_the_metrics_and_fire_the_drift_alerts(
    tmp_path: Path, start_node: Callable[..., Node], dcmtk: None
) -> None:
    write_pipeline(tmp_path / "pipelines", monitoring={"findings": {"nodule": BAND}})
    assert [b.quantity for b in load_pipeline(tmp_path / "pipelines" / f"{PIPELINE}.yaml").bands()] == list(BAND)
    baseline = [s.paths for seed in range(3) for s in write_synthetic_study(tmp_path / f"s{seed}", seed, n_slices=16)]
    shifted = [miscalibrated(paths, tmp_path / f"shifted{i}") for i, paths in enumerate(baseline)]
    node = start_node()
    scrapes = [scrape(node)]
    for batch in (baseline, shifted):
        assert storescu(node.port, *(p for paths in batch for p in paths)).returncode == 0
        done = len(baseline) * len(scrapes)
        wait_for(lambda: scored(node) == done, timeout=60, what=f"{done} series scored")  # noqa: B023
        scrapes.append(scrape(node))
    start, after_baseline, after_shift = scrapes

    # The scores the node exports are the SRs' probabilities, one per series.
    probabilities = sr_probabilities(results(node.results_dir))
    assert len(probabilities) == 2 * len(baseline)
    assert value(after_shift, "radpipe_series_score_sum", **NODULE) == pytest.approx(sum(probabilities))

    # What moved, phase by phase.
    phases = {"baseline": (start, after_baseline), "shifted": (after_baseline, after_shift)}
    observed = {}
    for phase, (before, after) in phases.items():
        count = delta(before, after, "radpipe_series_score_count", **NODULE)
        present = delta(before, after, "radpipe_findings_total", **NODULE, evaluation="present")
        absent = delta(before, after, "radpipe_findings_total", **NODULE, evaluation="absent")
        assert count == present + absent == len(baseline)
        observed[phase] = {
            "positive_rate": present / count,
            "mean_score": delta(before, after, "radpipe_series_score_sum", **NODULE) / count,
            "slices_le_8": delta(before, after, "radpipe_input_slices_bucket", pipeline=PIPELINE, le="8.0"),
            "slices_le_16": delta(before, after, "radpipe_input_slices_bucket", pipeline=PIPELINE, le="16.0"),
            "synthetic": delta(before, after, "radpipe_input_series_total", pipeline=PIPELINE, manufacturer="radpipe"),
        }
    print("observed per phase:", observed)
    for quantity, (low, high) in BAND.items():
        assert low <= observed["baseline"][quantity] <= high, (quantity, observed)
        assert observed["shifted"][quantity] > high, (quantity, observed)
    assert observed["baseline"]["slices_le_8"] == 0 and observed["baseline"]["slices_le_16"] == len(baseline)
    assert observed["shifted"]["slices_le_8"] == len(baseline)
    assert observed["baseline"]["synthetic"] == observed["shifted"]["synthetic"] == len(baseline)
    spacing = value(after_shift, "radpipe_input_pixel_spacing_mm_sum", pipeline=PIPELINE)
    assert spacing == pytest.approx(2 * len(baseline) * PIXEL_SPACING_MM)
    assert value(after_shift, "radpipe_finding_baseline", **NODULE, quantity="mean_score", bound="high") == 0.8

    # promtool, on the scraped values: the shifted traffic fires the band alerts, the baseline
    # does not; without a band, a week of baseline and then a day of shifted traffic fires
    # the week-long alert.
    def alert(instance: str, summary: str, description: str) -> dict:
        return {
            "exp_labels": {"severity": "warning", "instance": instance, **NODULE},
            "exp_annotations": {
                "summary": f"radpipe pipeline {PIPELINE}: nodule {summary}",
                "description": f"{description}: check the inputs (scanner, protocol, calibration) before "
                "trusting its results.",
            },
        }

    shifted_alerts = {
        "RadpipePositiveRateOutOfBand": alert(
            "shifted:9400",
            "positive rate out of its band",
            f"{observed['shifted']['positive_rate'] * 100:.4g}% of the last day's series on shifted:9400 were "
            f"nodule Present, outside the band validated for {PIPELINE}",
        ),
        "RadpipeMeanScoreOutOfBand": alert(
            "shifted:9400",
            "mean score out of its band",
            f"The last day's series on shifted:9400 scored {observed['shifted']['mean_score']:.2f} on average for "
            f"nodule, outside the band validated for {PIPELINE}",
        ),
    }
    score_shift = alert(
        "unbanded:9400",
        "scores shifted from last week",
        f"The last day's mean nodule score on unbanded:9400 is "
        f"{abs(observed['shifted']['mean_score'] - observed['baseline']['mean_score']):.2f} away from the 7 days "
        f"before; {PIPELINE} states no band (monitoring.findings), so last week is the baseline",
    )

    def cases(swapped: bool) -> list[dict]:
        """The three cases; ``swapped`` expects the opposite of what should happen."""

        def when(fires: bool, expected: dict) -> list[dict]:
            return [expected] if fires != swapped else []

        return [
            {
                "name": f"{phase} traffic",
                "interval": STEP,
                "input_series": input_series(f"{phase}:9400", [(*phases[phase], DAY)], bands=True),
                "alert_rule_test": [
                    {"eval_time": "2h", "alertname": name, "exp_alerts": when(phase == "shifted", shifted_alerts[name])}
                    for name in BAND_ALERTS
                ],
            }
            for phase in phases
        ] + [
            {
                "name": "a week of baseline traffic, then a day of shifted traffic, no band",
                "interval": STEP,
                "input_series": input_series(
                    "unbanded:9400", [(*phases["baseline"], 8 * DAY), (*phases["shifted"], DAY + 6)], bands=False
                ),
                "alert_rule_test": [
                    {"eval_time": "8d", "alertname": "RadpipeScoreShift", "exp_alerts": when(False, score_shift)},
                    {"eval_time": "9d", "alertname": "RadpipeScoreShift", "exp_alerts": when(True, score_shift)},
                    *({"eval_time": "9d", "alertname": name, "exp_alerts": []} for name in BAND_ALERTS),
                ],
            }
        ]

    out = promtool_test(tmp_path, cases(swapped=False))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    # With the expectations swapped, promtool fails every one of them.
    out = promtool_test(tmp_path, cases(swapped=True))
    assert out.returncode == 1, out.stdout + out.stderr
    for phase in phases:
        for name in BAND_ALERTS:
            assert f"name: {phase} traffic,\n    alertname: {name}, time: 2h" in out.stderr, out.stderr
    for time in ("8d", "9d"):
        assert f"alertname: RadpipeScoreShift, time: {time}," in out.stderr, out.stderr


HEAD = (
    "name: p\nversion: 1\nmatch: {Modality: CT}\nmodel: {artifact: ARTIFACT}\npostprocess:\n"
    '  findings: [{label: nodule, code: [SCT, "27925004", Nodule]}]\nmonitoring:\n  findings:\n'
)


@pytest.mark.parametrize(
    ("band", "error"),
    [
        (
            "    nodule: {positive_rate: [0.7, 0.2]}\n",
            "9:14: monitoring.findings.nodule.positive_rate: [low, high]: low 0.7 is above high 0.2",
        ),
        (
            "    nodule: {mean_score: [0.1, 1.5]}\n",
            "9:32: monitoring.findings.nodule.mean_score.1: Input should be less than or equal to 1",
        ),
        (
            "    nodule: {mean_score: [0.1]}\n",
            "9:14: monitoring.findings.nodule.mean_score.1: Field required",
        ),
        (
            "    nodule: {positive_rate: [0.1, 0.2], median: [0, 1]}\n",
            "9:41: monitoring.findings.nodule.median: Extra inputs are not permitted",
        ),
        (
            "    mass: {positive_rate: [0.1, 0.2]}\n",
            "9:5: monitoring.findings.mass: 'mass' is not a finding of this pipeline (findings: ['nodule'])",
        ),
    ],
)
def test_a_bad_band_is_reported_at_its_key(tmp_path: Path, band: str, error: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text((HEAD + band).replace("ARTIFACT", str(DEMO_ARTIFACT)))
    with pytest.raises(PipelineError) as raised:
        load_pipeline(path)
    assert str(raised.value) == f"{path}:{error}"


def test_bands_of_a_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        (HEAD + "    nodule: {mean_score: [0.2, 0.4], positive_rate: [0.05, 0.25]}\n").replace(
            "ARTIFACT", str(DEMO_ARTIFACT)
        )
    )
    assert load_pipeline(path).bands() == [
        Band("p", "nodule", "positive_rate", 0.05, 0.25),
        Band("p", "nodule", "mean_score", 0.2, 0.4),
    ]


def test_the_readme_band_example_is_valid(tmp_path: Path) -> None:
    [example] = re.findall(r"```yaml\n(monitoring:\n.*?)```", (REPO / "README.md").read_text(), re.S)
    path = tmp_path / "p.yaml"
    path.write_text(HEAD.replace("ARTIFACT", str(DEMO_ARTIFACT)).removesuffix("monitoring:\n  findings:\n") + example)
    assert [(b.quantity, b.low, b.high) for b in load_pipeline(path).bands()] == [
        ("positive_rate", 0.05, 0.2),
        ("mean_score", 0.1, 0.3),
    ]
