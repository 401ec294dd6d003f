"""No patient name or ID in anything the node prints: its own lines, library warnings
(highdicom quotes a patient name it finds odd), DEBUG output of every library, `radpipe
status`, in text or JSON; and JSON mode prints JSON only."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from plugin.logs import REDACTED, TEXT_FORMAT, ContextFilter, JSONFormatter, OneLineFormatter, ScrubFilter, redacting
from tests.conftest import node_config, results, storescu, wait_for, write_pipeline

RADPIPE = str(Path(sys.executable).parent / "radpipe")
# Names a person-name check finds odd (no caret, digits), the ID repeated as the name,
# components that must go one by one, and letters beyond ASCII.
PATIENTS = [
    ("Zyxwvutsrq", "PID-5551234"),
    ("73519246", "73519246"),
    ("Qwertyuiop^Asdfghjkl", "ZQX-0042-77"),
    ("Ölundström^Åsa", "SE-19121212"),
]


def _series_of(patient: tuple[str, str], paths: list[Path], out_dir: Path) -> list[Path]:
    """A copy of a synthetic series under new UIDs, belonging to ``patient``."""
    name, patient_id = patient
    study, series = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True)
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = name, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out_dir / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def _secrets() -> list[str]:
    values = set()
    for name, patient_id in PATIENTS:
        values.update({name, patient_id, *name.split("^")})
    return sorted(values)


def test_no_patient_name_or_id_in_any_output_of_the_node(tmp_path: Path, demo_study, storescp) -> None:
    pacs_port, pacs_dir = storescp
    config = node_config(tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}})
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    # Every output type: Comprehensive 3D SR + KOS, and Enhanced SR.
    catch_all = {"Modality": "CT"}
    outputs = [{"sr": {"sop_class": "comprehensive3d"}}, {"kos": {"when": "always"}}]
    write_pipeline(tmp_path / "pipelines", name="privacy-c3d", match=catch_all, outputs=outputs)
    write_pipeline(
        tmp_path / "pipelines", name="privacy-enhanced", match=catch_all, outputs=[{"sr": {"sop_class": "enhanced"}}]
    )
    source = demo_study["Demo chest CT, nodules"][:4]
    series = [_series_of(p, source, tmp_path / f"series{i}") for i, p in enumerate(PATIENTS)]

    log_path = tmp_path / "node.log"
    with log_path.open("wb") as log:
        command = [RADPIPE, "--log-level", "DEBUG", "--log-format", "json", "serve", "--config", "radpipe.yaml"]
        node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=os.environ)
    try:
        wait_for(lambda: "listening on" in log_path.read_text(), what="the node to listen")
        for paths in series:
            assert storescu(config["node"]["port"], *paths).returncode == 0
        expected = len(PATIENTS) * 3  # C3D SR + KOS + Enhanced SR per series
        wait_for(lambda: len(results(tmp_path / "data" / "results")) == expected, what="every result")
        wait_for(lambda: len(list(pacs_dir.iterdir())) == expected, what="every result at the PACS")
        status = subprocess.run(
            [RADPIPE, "status", "--config", "radpipe.yaml"], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    assert node.returncode == 0

    # The names did reach the results (so they passed through every stage) ...
    written = {str(pydicom.dcmread(p).PatientName) for p in results(tmp_path / "data" / "results")}
    assert written == {name for name, _ in PATIENTS}
    # ... and no output carries them.
    output = log_path.read_text(encoding="utf-8") + status.stdout + status.stderr
    for secret in _secrets():
        assert secret not in output, f"patient attribute {secret!r} in the node's output"
    entries = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]  # JSON lines only
    # highdicom's warning about a single-component name arrives as a record, its value replaced.
    warned = [e for e in entries if e["logger"] == "py.warnings" and "unlikely to represent" in e["message"]]
    assert warned and all(f'"{REDACTED}"' in e["message"] for e in warned), warned
    assert not [e for e in entries if "Traceback" in e["message"] or e.get("exception")]


def test_scrubbing_covers_messages_arguments_tracebacks_and_library_quotes() -> None:
    handler_filters = [ContextFilter(), ScrubFilter()]

    def formatted(name: str, message: str, *args: object, exc: BaseException | None = None) -> list[str]:
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)
        if exc is not None:
            record.exc_info = (type(exc), exc, exc.__traceback__)
        for f in handler_filters:
            f.filter(record)
        return [OneLineFormatter(TEXT_FORMAT).format(record), JSONFormatter().format(record)]

    with redacting(["Zyxwvutsrq", "PID-5551234"]):
        try:
            raise ValueError("bad name Zyxwvutsrq")
        except ValueError as e:
            lines = formatted("plugin.runner", "patient %s", "PID-5551234", exc=e)
    lines += formatted("py.warnings", 'UserWarning: The string "Somebody" is unlikely to represent')
    lines += formatted("pydicom", "Invalid value for VR PN: 'Somebody Else'")
    forged = formatted("pydicom", "value\rFAKE 2026-01-01 CRITICAL plugin.node [x -] forged\x1b[2J")[0]
    assert "\\rFAKE" in forged and "\\x1b[2J" in forged and forged.isprintable()
    for secret in ("Zyxwvutsrq", "PID-5551234", "Somebody"):
        assert secret not in "\n".join(lines)
    assert all(REDACTED in line for line in lines)
    assert "ValueError: bad name ***" in lines[0] and "ValueError: bad name ***" in json.loads(lines[1])["exception"]
    # Outside a redacting block, the node's own lines are left as they are.
    assert "PID-5551234" in formatted("plugin.runner", "PID-5551234")[0]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_warnings_uncaught_exceptions_and_raw_stderr_are_lines(log_format: str) -> None:
    code = (
        "import threading, warnings; from plugin.logs import configure\n"
        f"configure('INFO', {log_format!r})\n"
        "warnings.warn('The string \"Zyxwvutsrq\" is odd')\n"
        "def work():\n"
        "    raise RuntimeError('boom')\n"
        "t = threading.Thread(target=work, name='worker'); t.start(); t.join()\n"
        "import os, time; os.write(2, b'[ERROR] openjpeg: Invalid number of tiles\\n'); time.sleep(0.5)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Zyxwvutsrq" not in out.stderr and "uncaught exception in thread worker" in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert "Invalid number of tiles" in lines[-1]
    if log_format == "json":  # a C library's raw write to stderr included
        assert [json.loads(line)["logger"] for line in lines] == ["py.warnings", "plugin.logs", "stderr"]
