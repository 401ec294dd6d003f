"""A study's trace id: one id, derived from its Study Instance UID, on its records at every
stage (receipt, assembly, job, delivery) and in ``radpipe status``, so one study can be
followed from C-STORE to delivery."""

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import yaml

from plugin.demo.series import write_synthetic_study
from plugin.logs import TEXT_FORMAT, ContextFilter, OneLineFormatter, log_context, trace_id
from tests.conftest import node_config, storescu, wait_for, write_pipeline
from tests.test_dispatch import start_pacs

RADPIPE = str(Path(sys.executable).parent / "radpipe")


def test_trace_id_is_a_short_function_of_the_study_uid() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert trace_id(uid) == trace_id(uid) != trace_id(uid + "1")
    assert len(trace_id(uid)) == 16 and uid not in trace_id(uid)
    record = logging.LogRecord("plugin.x", logging.INFO, __file__, 1, "hello", (), None)
    with log_context("job-1", uid):
        ContextFilter().filter(record)
    assert f"trace={trace_id(uid)} [MainThread job-1] hello" in OneLineFormatter(TEXT_FORMAT).format(record)


def test_one_study_is_followed_from_receipt_to_delivery(
    tmp_path: Path, radpipe: Callable[..., tuple[int, str]], dcmtk: None
) -> None:
    received: list[pydicom.Dataset] = []
    pacs, pacs_port = start_pacs(received)
    config = node_config(tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}})
    config_path = tmp_path / "radpipe.yaml"
    config_path.write_text(yaml.safe_dump(config))
    write_pipeline(tmp_path / "pipelines", destinations=["pacs"])
    studies = [write_synthetic_study(tmp_path / f"s{seed}", seed, n_slices=8) for seed in range(2)]
    log_path = tmp_path / "node.log"
    argv = [RADPIPE, "--log-level", "DEBUG", "--log-format", "json", "serve", "--config", str(config_path)]
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            wait_for(lambda: "listening on" in log_path.read_text(), timeout=60, what="the node to listen")
            for study in studies:
                assert storescu(config["node"]["port"], *[p for series in study for p in series.paths]).returncode == 0
            wait_for(lambda: len(received) == 4, timeout=60, what="both studies' SRs at the PACS")
            wait_for(lambda: log_path.read_text().count(": delivered") == 4, what="the delivery lines")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    finally:
        pacs.shutdown()
    assert process.returncode == 0, log_path.read_text()[-3000:]

    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    header = pydicom.dcmread(studies[0][0].paths[0], stop_before_pixels=True)
    study_uid = str(header.StudyInstanceUID)
    trace = trace_id(study_uid)
    other = trace_id(str(pydicom.dcmread(studies[1][0].paths[0], stop_before_pixels=True).StudyInstanceUID))
    assert other != trace
    mine = [e for e in entries if e["trace"] == trace]
    receipts = [e for e in mine if e["logger"] == "plugin.node" and "instance stored" in e["message"]]
    assert len(receipts) == 2 * 8  # every instance of its two series
    assert len([e for e in mine if e["logger"] == "plugin.assembler" and "complete" in e["message"]]) == 2
    job_contexts = {e["context"] for e in mine if e["logger"] == "plugin.runner"}
    assert len(job_contexts) == 2 and all(c.startswith("job-") for c in job_contexts)
    delivered = [e for e in mine if e["logger"] == "plugin.dispatch" and "delivered" in e["message"]]
    assert {e["context"] for e in delivered} == {f"{c}/pacs" for c in job_contexts}
    # Every record of this study's work carries its id, none the other study's.
    for e in entries:
        if e["context"] in job_contexts or e["context"] in {f"{c}/pacs" for c in job_contexts}:
            assert e["trace"] == trace, e

    code, out = radpipe("status", "--config", str(config_path), "--trace", trace)
    assert code == 0, out
    assert f"trace {trace}: study {study_uid}" in out and "instances: 16 received" in out
    assert "jobs: 2" in out and out.count(" done ") == 2 and "lung-nodule-demo" in out
    assert "deliveries: 2" in out and out.count("-> pacs: delivered, 1 tries") == 2
    code, by_study = radpipe("status", "--config", str(config_path), "--study", study_uid)
    assert code == 0 and by_study == out
    code, overview = radpipe("status", "--config", str(config_path))
    assert code == 0 and overview.count(f"trace={trace}") == 2 and overview.count(f"trace={other}") == 2
    assert radpipe("status", "--config", str(config_path), "--trace", "0" * 16)[0] == 1

    text = log_path.read_text() + out + overview
    for value in (str(header.PatientName), str(header.PatientID)):
        assert value and value not in text
