"""Logs: one line per event, JSON with ``--log-format json``, each line of an association's
or a job's work tagged with its id, and no patient identity in any line."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from plugin.logs import TEXT_FORMAT, ContextFilter, JSONFormatter, OneLineFormatter, log_context
from tests.conftest import free_port, node_config, results, storescu, wait_for, write_pipeline

RADPIPE = str(Path(sys.executable).parent / "radpipe")


def test_records_carry_the_context_and_stay_on_one_line() -> None:
    record = logging.LogRecord("plugin.x", logging.ERROR, __file__, 1, "two\nlines %s", ("here",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    with log_context("job-7"):
        assert ContextFilter().filter(record)
    outside = logging.LogRecord("plugin.x", logging.INFO, __file__, 1, "plain", (), None)
    ContextFilter().filter(outside)
    assert outside.context == "-"

    text = OneLineFormatter(TEXT_FORMAT).format(record)
    assert "\n" not in text and "[MainThread job-7] two\\nlines here" in text and "ValueError: boom" in text
    entry = json.loads(JSONFormatter().format(record))
    assert entry["context"] == "job-7" and entry["message"] == "two\nlines here" and entry["level"] == "ERROR"
    assert "ValueError: boom" in entry["exception"]


def test_serve_logs_json_lines_with_association_and_job_ids(tmp_path: Path, demo_study, dcmtk) -> None:
    series = demo_study["Demo chest CT, no nodules"]
    # A destination nobody listens on: the dispatcher logs its failed tries.
    config = node_config(
        tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}}
    )
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    write_pipeline(tmp_path / "pipelines")
    # An instance without a Study Instance UID: the C-STORE handler refuses it and says so.
    bad = pydicom.dcmread(series[0])
    del bad.StudyInstanceUID
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)

    log_path = tmp_path / "node.log"
    port = config["node"]["port"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [RADPIPE, "--log-format", "json", "serve", "--config", str(tmp_path / "radpipe.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ,
        )
    try:
        wait_for(lambda: "listening on" in log_path.read_text(), timeout=60, what="the node to listen")
        assert storescu(port, *series).returncode == 0
        storescu(port, tmp_path / "bad.dcm")  # refused (storescu's exit status varies with the status class)
        wait_for(lambda: results(tmp_path / "data" / "results"), timeout=60, what="the SR")
        wait_for(lambda: "pacs" in log_path.read_text() and "job-" in log_path.read_text(), what="dispatch lines")
    finally:
        process.send_signal(signal.SIGTERM)
        try:  # the node may take node.shutdown_seconds (30) for work in flight, then exits
            process.wait(45)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("the node did not exit within 45 s of SIGTERM:\n" + log_path.read_text()[-3000:])
    assert process.returncode == 0, log_path.read_text()[-3000:]

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "context", "message"} <= set(e) for e in entries)
    by_logger: dict[str, list[dict]] = {}
    for entry in entries:
        by_logger.setdefault(entry["logger"], []).append(entry)

    job_lines = by_logger["plugin.runner"]
    assert job_lines and all(re.fullmatch(r"job-\d+", e["context"]) for e in job_lines), job_lines
    delivery_lines = by_logger["plugin.dispatch"]
    assert delivery_lines and all(re.fullmatch(r"job-\d+/pacs", e["context"]) for e in delivery_lines)
    # Each failed try to the dead destination is that one line: pynetdicom's own lines would repeat it.
    assert not [e for e in entries if e["logger"].startswith("pynetdicom")]
    refusals = [e for e in by_logger["plugin.node"] if "C-STORE" in e["message"]]
    assert refusals and all(re.fullmatch(r"assoc-\d+", e["context"]) for e in refusals), by_logger["plugin.node"]

    # No patient identity in the logs.
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    text = log_path.read_text()
    for value in (str(header.PatientName), str(header.PatientID)):
        assert value and value not in text
