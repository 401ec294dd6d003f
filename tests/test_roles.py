"""Roles (``node.roles``, ``radpipe serve --roles``): nodes sharing a PostgreSQL journal
and a storage folder split the work. A receive-only node stores and journals, and never
imports torch; a node without ``receive`` does the rest and does not listen."""

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugin.app import Node
from plugin.config import ConfigError, load_config
from tests.conftest import (
    serve,
    shared_journal,
    storescu,
    wait_for,
    write_node_config,
    write_pipeline,
)

# An import line of PYTHONPROFILEIMPORTTIME: "import time: <self us> | <cumulative us> | <indent><module>".
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", re.MULTILINE)


def test_an_unknown_role_is_a_config_error_before_anything_starts(radpipe: Callable[..., tuple[int, str]]) -> None:
    code, out = radpipe("serve", "--roles", "receive,gpu")
    assert (code, out) == (1, "--roles: node.roles: unknown role 'gpu': roles are receive, assemble, infer, dispatch\n")


def test_roles_from_the_file_the_environment_and_the_command_line(tmp_path: Path) -> None:
    """As every option: the environment wins over the file, the command line over both;
    a comma-separated string is a list; an error names who set the key."""
    path = tmp_path / "radpipe.yaml"
    path.write_text("node:\n  roles: [receive, dispatch]\n")
    assert load_config(path, environ={}).node.roles == ["receive", "dispatch"]
    assert load_config(path, environ={"RADPIPE_NODE_ROLES": "infer, assemble"}).node.roles == ["infer", "assemble"]
    command_line = {"--roles": ("node", "roles", "infer")}
    assert load_config(path, {"RADPIPE_NODE_ROLES": "receive"}, command_line).node.roles == ["infer"]
    assert load_config(None, environ={}).node.roles == ["receive", "assemble", "infer", "dispatch"]
    with pytest.raises(ConfigError, match=r"^RADPIPE_NODE_ROLES: node.roles: a role is given twice: infer, infer$"):
        load_config(path, environ={"RADPIPE_NODE_ROLES": "infer,infer"})
    path.write_text("node:\n  roles: []\n")
    with pytest.raises(ConfigError, match=r"radpipe.yaml:2:3: node.roles: List should have at least 1 item"):
        load_config(path, environ={})


def test_a_receive_only_node_stores_what_another_node_infers_and_delivers(
    postgres_url: str,
    tmp_path: Path,
    demo_study: dict[str, list[Path]],
    storescp: tuple[int, Path],
    monkeypatch: pytest.MonkeyPatch,
    start_node: Callable[..., Node],
) -> None:
    """The receiver (a process of its own, roles: receive) acknowledges a series; the
    worker (roles: assemble, infer, dispatch; no listener) closes it, runs the model and
    sends the SR to dcmtk's storescp. The receiver imported no torch and read no pipeline;
    its /metrics carries node="receiver"."""
    pacs_port, pacs_dir = storescp
    write_pipeline(tmp_path / "pipelines")
    shared = shared_journal(postgres_url, pacs_port)
    config, receiver_config = write_node_config(tmp_path, node={"id": "receiver", "roles": ["receive"]}, **shared)
    port = receiver_config["node"]["port"]
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the receiver logs every module it imports
    receiver = serve(config, port, tmp_path / "receiver.log")
    monkeypatch.delenv("PYTHONPROFILEIMPORTTIME")
    try:
        worker = start_node(node={"id": "worker", "roles": ["assemble", "infer", "dispatch"]}, **shared)
        assert worker.servers == [] and worker.stow_server is None
        series = demo_study["Demo chest CT, no nodules"]
        assert storescu(port, *series).returncode == 0
        wait_for(lambda: list(pacs_dir.iterdir()), what="the SR at storescp")
        [sr] = [pydicom.dcmread(path) for path in pacs_dir.iterdir()]
        [reference] = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert sr.Modality == "SR" and reference.SeriesInstanceUID == pydicom.dcmread(series[0]).SeriesInstanceUID
        [job] = worker.journal.jobs()
        assert job.status == "done"

        url = f"http://127.0.0.1:{receiver_config['metrics']['port']}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        [received] = [s for s in families["radpipe_instances_received"].samples if s.name.endswith("_total")]
        assert received.labels == {"calling_ae": "STORESCU", "node": "receiver"} and received.value == len(series)
        assert not families["radpipe_model_info"].samples
    finally:
        receiver.terminate()
        assert receiver.wait(60) == 0
    log = (tmp_path / "receiver.log").read_text()
    assert "node receiver roles: receive" in log
    imported = IMPORTED.findall(log)
    assert "plugin.node" in imported and "plugin.app" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "monai", "onnxruntime", "highdicom")]
    assert heavy == [] and not any(
        m.startswith(("plugin.models", "plugin.runner", "plugin.pipeline")) for m in imported
    )
    assert "pipeline lung-nodule-demo" not in log and "pipelines folder" not in log  # none read, none missed


def test_receivers_and_gpu_workers_as_kubernetes_splits_them(
    postgres_url: str,
    tmp_path: Path,
    demo_study: dict[str, list[Path]],
    storescp: tuple[int, Path],
    start_node: Callable[..., Node],
) -> None:
    """deploy/kubernetes/scale-out's split: a receiver (receive, assemble, dispatch) that
    loads no model, and a worker (infer) that neither listens nor closes series. The
    receiver closes the series, the worker writes the SR into the shared storage, the
    receiver sends it."""
    pacs_port, pacs_dir = storescp
    shared = shared_journal(postgres_url, pacs_port)
    receiver = start_node(node={"id": "receiver", "roles": ["receive", "assemble", "dispatch"]}, **shared)
    worker = start_node(node={"id": "worker", "roles": ["infer"]}, **shared)
    assert receiver.pool is None and worker.servers == [] and worker.stow_server is None
    assert {w.name for w in worker.workers} == {"runner", "pipeline-reloader"}
    series = demo_study["Demo chest CT, nodules"]
    assert storescu(receiver.port, *series).returncode == 0
    wait_for(lambda: list(pacs_dir.iterdir()), what="the SR at storescp")
    [sr] = [pydicom.dcmread(path, stop_before_pixels=True) for path in pacs_dir.iterdir()]
    assert sr.Modality == "SR"
    pipeline = {"pipeline": "lung-nodule-demo"}
    delivered = {"destination": "pacs"}
    # storescp writes the file before its response reaches the dispatcher, and the worker
    # counts its job after the commit that lets the receiver send: each count comes soon after.
    done = {**pipeline, "status": "done"}
    wait_for(lambda: worker.metrics.registry.get_sample_value("radpipe_jobs_total", done), what="the job count")
    wait_for(lambda: receiver.metrics.registry.get_sample_value("radpipe_results_delivered_total", delivered),
             what="the delivery count")  # fmt: skip
    assert worker.metrics.registry.get_sample_value("radpipe_jobs_total", done) == 1
    assert receiver.metrics.registry.get_sample_value("radpipe_jobs_total", done) == 0
    assert receiver.metrics.registry.get_sample_value("radpipe_results_delivered_total", delivered) == 1
    assert worker.metrics.registry.get_sample_value("radpipe_results_delivered_total", delivered) == 0
    for node, models in ((receiver, 0), (worker, 1)):
        [info] = [m for m in node.metrics.registry.collect() if m.name == "radpipe_model_info"]
        assert len(info.samples) == models
