"""The /metrics endpoint serves every metric of the contract, in Prometheus text format."""

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import Dataset

from plugin.metrics import MANUFACTURER_OTHER, MANUFACTURERS, Band, Metrics, exposition, manufacturer_label

CONTRACT = {
    "radpipe_instances_received",
    "radpipe_instances_rejected",
    "radpipe_studies_completed",
    "radpipe_jobs",
    "radpipe_stage_seconds",
    "radpipe_inference_batch_size",
    "radpipe_queue_depth",
    "radpipe_results_delivered",
    "radpipe_dispatch_failures",
    "radpipe_config_reloads",
    "radpipe_model_info",
    "radpipe_spool_free_bytes",
}


def test_metrics_endpoint_serves_the_contract(start_node):
    """Every sample served carries the node's id (node.id) as its ``node`` label; the
    registry the node reads has none."""
    node = start_node(node={"id": "radpipe-gpu-0"})
    url = f"http://127.0.0.1:{node.metrics_server[0].server_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) >= CONTRACT
    samples = [s for family in families.values() for s in family.samples]
    assert len(samples) > 100 and {s.labels.get("node") for s in samples} == {"radpipe-gpu-0"}
    [info] = families["radpipe_model_info"].samples
    assert info.labels == {
        "pipeline": "lung-nodule-demo",
        "model": "lung-nodule-demo",
        "precision": "fp32",
        "device": "cpu",
        "sparsity": "0.0",
        "node": "radpipe-gpu-0",
    }
    unlabelled = {k: v for k, v in info.labels.items() if k != "node"}
    assert node.metrics.registry.get_sample_value("radpipe_model_info", unlabelled) == 1
    depths = {s.labels["queue"]: s.value for s in families["radpipe_queue_depth"].samples}
    assert depths == {"assembly": 0, "jobs": 0, "running": 0, "dispatch": 0, "dead_letter": 0}
    assert families["radpipe_spool_free_bytes"].samples[0].value > 0


def _header(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_monitoring_observations_on_a_fresh_registry() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.add_pipeline_labels("lung", [])
    get = metrics.registry.get_sample_value
    # Input series exist at zero for every manufacturer value before the first series.
    assert get("radpipe_input_series_total", {"pipeline": "lung", "manufacturer": "other"}) == 0
    assert get("radpipe_input_slices_count", {"pipeline": "lung"}) == 0

    headers = [_header(Manufacturer="SIEMENS", PixelSpacing=[0.7, 0.7], PatientName="Doe^Jane")] * 40
    metrics.observe_input("lung", headers)
    metrics.observe_input("lung", [_header(Manufacturer="Acme^Jane")])
    assert get("radpipe_input_slices_bucket", {"pipeline": "lung", "le": "32.0"}) == 1  # the 1-image series
    assert get("radpipe_input_slices_bucket", {"pipeline": "lung", "le": "64.0"}) == 2
    assert get("radpipe_input_pixel_spacing_mm_count", {"pipeline": "lung"}) == 1  # none given: not observed
    assert get("radpipe_input_pixel_spacing_mm_sum", {"pipeline": "lung"}) == 0.7
    assert get("radpipe_input_series_total", {"pipeline": "lung", "manufacturer": "siemens"}) == 1
    assert get("radpipe_input_series_total", {"pipeline": "lung", "manufacturer": "other"}) == 1

    metrics.observe_finding("lung", "nodule", 0.93, True)
    metrics.observe_finding("lung", "nodule", 0.12, False)
    metrics.observe_finding("lung", "nodule", 0.41, False)
    labels = {"pipeline": "lung", "finding": "nodule"}
    assert get("radpipe_findings_total", {**labels, "evaluation": "present"}) == 1
    assert get("radpipe_findings_total", {**labels, "evaluation": "absent"}) == 2
    assert get("radpipe_series_score_bucket", {**labels, "le": "0.5"}) == 2
    assert get("radpipe_series_score_sum", labels) == pytest.approx(1.46)

    metrics.observe_lesions("liver", "lesion", 0)
    metrics.observe_lesions("liver", "lesion", 4)
    assert get("radpipe_series_lesions_bucket", {"pipeline": "liver", "segment": "lesion", "le": "0.0"}) == 1
    assert get("radpipe_series_lesions_bucket", {"pipeline": "liver", "segment": "lesion", "le": "5.0"}) == 2

    # Nothing a header held besides the mapped manufacturer is a label value.
    exposition = generate_latest(metrics.registry).decode()
    assert "Doe" not in exposition and "Acme" not in exposition and "Jane" not in exposition


@pytest.mark.parametrize(
    ("manufacturer", "label"),
    [
        ("GE MEDICAL SYSTEMS", "ge"),
        ("GE Healthcare", "ge"),
        ("Vantage Imaging", "other"),  # "ge" inside a word is not GE
        ("SIEMENS", "siemens"),
        ("Siemens Healthineers", "siemens"),
        ("Philips Medical Systems", "philips"),
        ("TOSHIBA", "canon"),
        ("Canon Medical Systems", "canon"),
        ("Hitachi Medical Corporation", "fujifilm"),
        ("UIH", "united_imaging"),
        ("radpipe", "radpipe"),
        ("", "unknown"),
        (None, "unknown"),
        ("Doe^John", "other"),
    ],
)
def test_manufacturer_label_is_bounded(manufacturer: str | None, label: str) -> None:
    assert manufacturer_label(manufacturer) == label
    assert label in (*MANUFACTURERS, *MANUFACTURER_OTHER)


def test_baseline_bands_are_read_at_scrape_time() -> None:
    metrics = Metrics(CollectorRegistry())
    bands = [Band("lung", "nodule", "positive_rate", 0.1, 0.3)]
    metrics.observe_baselines(lambda: bands)
    get = metrics.registry.get_sample_value
    labels = {"pipeline": "lung", "finding": "nodule", "quantity": "positive_rate"}
    assert get("radpipe_finding_baseline", {**labels, "bound": "low"}) == 0.1
    assert get("radpipe_finding_baseline", {**labels, "bound": "high"}) == 0.3
    bands.clear()  # a reload that drops the band: its series goes with it
    assert get("radpipe_finding_baseline", {**labels, "bound": "low"}) is None


def test_the_exposition_adds_the_node_label_to_every_sample_at_scrape_time() -> None:
    """Counters, histograms and the scrape-time collectors alike; later observations show."""
    metrics = Metrics(CollectorRegistry())
    metrics.add_pipeline_labels("lung", ["pacs"])
    metrics.observe_baselines(lambda: [Band("lung", "nodule", "positive_rate", 0.1, 0.3)])
    served = exposition(metrics, "radpipe-gpu-0")
    done = {"pipeline": "lung", "status": "done"}
    assert served.get_sample_value("radpipe_jobs_total", {**done, "node": "radpipe-gpu-0"}) == 0
    metrics.jobs.labels(*done.values()).inc()
    assert served.get_sample_value("radpipe_jobs_total", {**done, "node": "radpipe-gpu-0"}) == 1
    assert served.get_sample_value("radpipe_jobs_total", done) is None  # only ever with the label
    metrics.inference_batch_size.observe(4)
    bucket = {"le": "4.0", "node": "radpipe-gpu-0"}
    assert served.get_sample_value("radpipe_inference_batch_size_bucket", bucket) == 1
    baseline = {"pipeline": "lung", "finding": "nodule", "quantity": "positive_rate", "bound": "low"}
    assert served.get_sample_value("radpipe_finding_baseline", {**baseline, "node": "radpipe-gpu-0"}) == 0.1
    samples = [s for family in served.collect() for s in family.samples]
    assert len(samples) > 50 and {s.labels["node"] for s in samples} == {"radpipe-gpu-0"}
