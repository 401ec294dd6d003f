"""The /metrics endpoint serves every metric of the contract, in Prometheus text format."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

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
    node = start_node()
    url = f"http://127.0.0.1:{node.metrics_server[0].server_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) >= CONTRACT
    [info] = families["radpipe_model_info"].samples
    assert info.labels == {
        "pipeline": "lung-nodule-demo",
        "model": "lung-nodule-demo",
        "precision": "fp32",
        "device": "cpu",
        "sparsity": "0.0",
    }
    depths = {s.labels["queue"]: s.value for s in families["radpipe_queue_depth"].samples}
    assert depths == {"assembly": 0, "jobs": 0, "running": 0, "dispatch": 0, "dead_letter": 0}
    assert families["radpipe_spool_free_bytes"].samples[0].value > 0
