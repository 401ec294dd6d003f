"""The command line, run as a user runs it: subprocesses through both entry points."""

import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import DEID_HUMANS, PYDICOM_FILES, REPO, free_port, node_config, wait_for, write_pipeline

RADPIPE = [os.path.join(os.path.dirname(sys.executable), "radpipe")]
MODULE = [sys.executable, "-m", "plugin"]


def _start(command, port, cwd=None, env=None):
    """Start a node process; return it once it answers C-ECHO on ``port``."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        echo = subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(port)], capture_output=True)
        if echo.returncode == 0:
            return process
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    process.kill()
    raise AssertionError("node did not answer C-ECHO within 60 s")


def _stop(process):
    """SIGTERM; the node's whole output once it has exited cleanly."""
    process.terminate()
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    return output


def _serve(entry, tmp_path, env_port):
    config = node_config(tmp_path)
    del config["node"]["port"]  # given through the environment instead
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    write_pipeline(tmp_path / "pipelines")
    write_pipeline(tmp_path / "pipelines", REPO / "pipelines" / "lung-nodule-seg-demo.yaml")
    env = {**os.environ, "RADPIPE_NODE_PORT": str(env_port)}
    return _start([*entry, "serve", "--config", str(tmp_path / "radpipe.yaml")], env_port, env=env)


@pytest.mark.parametrize("entry", [RADPIPE, MODULE], ids=["radpipe", "python-m-plugin"])
def test_serve_answers_echo_and_demo_reports_findings_and_lesions(entry, tmp_path, dcmtk):
    port = free_port()
    process = _serve(entry, tmp_path, port)
    try:
        demo = subprocess.run(
            [
                *entry,
                "demo",
                "--port",
                str(port),
                "--results",
                str(tmp_path / "data" / "results"),
                "--timeout",
                "60",
                "--seed",
                "7",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "Demo chest CT, nodules: Nodule PRESENT, probability" in demo.stdout
        assert "Demo chest CT, no nodules: Nodule absent, probability" in demo.stdout
        # how many lesions the demo model outlines is the model's business (its manifest scores it);
        # the command reports each against the phantom's truth
        outlined = r"Demo chest CT, {}: \d+ lesion\(s\) outlined; the phantom drew {} nodule\(s\)"
        assert re.search(outlined.format("nodules", 3), demo.stdout)
        assert re.search(outlined.format("no nodules", 0), demo.stdout)
        assert re.search(r"  lesion nodule 1: \d+ mm3, diameter [\d.]+ mm; truth nodule \d: \d+ mm3", demo.stdout)
    finally:
        output = _stop(process)
    assert f"DICOM node RADPIPE listening on 127.0.0.1:{port}" in output
    assert re.search(r"node \S+ stopping: .*\n(.*\n)*.*node \S+ stopped$", output.rstrip(), re.M), output[-2000:]
    assert "INFO openjpeg" not in output  # the SEG's JPEG 2000 encoder logs a line per frame at INFO


def test_demo_without_a_node_says_so_in_one_line(tmp_path):
    demo = subprocess.run(
        [*RADPIPE, "demo", "--port", str(free_port()), "--results", str(tmp_path)], capture_output=True, text=True
    )
    assert demo.returncode == 2, demo.stdout + demo.stderr
    assert demo.stderr.splitlines()[-1].startswith("not sent: RADPIPE@127.0.0.1:"), demo.stderr
    assert "is `radpipe serve` running there?" in demo.stderr and "Traceback" not in demo.stderr


def test_relative_paths_in_the_config_are_taken_from_its_folder(tmp_path, dcmtk):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_pipeline(site / "pipelines")
    port = free_port()
    config = {"node": {"port": port}, "metrics": {"port": 0}, "storage": {"dir": "data", "min_free_mb": 1}}
    (site / "radpipe.yaml").write_text(yaml.safe_dump({**config, "pipelines": {"dir": "pipelines"}}))
    relative = ["--config", "../site/radpipe.yaml"]  # started from another folder, as a service manager would
    process = _start([*RADPIPE, "serve", *relative], port, cwd=elsewhere)
    try:
        status = subprocess.run([*RADPIPE, "status", *relative], cwd=elsewhere, capture_output=True, text=True)
    finally:
        output = _stop(process)
    assert f"pipeline lung-nodule-demo v1 loaded from {site / 'pipelines' / 'lung-nodule-demo.yaml'}" in output
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[0] == f"pipelines: 1 in {site / 'pipelines'}: lung-nodule-demo v1"
    assert (site / "data" / "journal.sqlite").is_file()
    assert list(elsewhere.iterdir()) == []


def test_serve_without_pipelines_says_so_at_start_and_in_status(tmp_path, dcmtk):
    port = free_port()
    env = {
        **os.environ,
        "RADPIPE_NODE_PORT": str(port),
        "RADPIPE_METRICS_PORT": "0",
        "RADPIPE_STORAGE_MIN_FREE_MB": "1",
    }
    process = _start([*RADPIPE, "serve"], port, cwd=tmp_path, env=env)  # no config: ./pipelines, not there
    folder = tmp_path / "pipelines"
    try:
        # The node answers C-ECHO before it loads its pipelines, which makes the folder.
        wait_for(folder.is_dir, timeout=60, what="the node making its pipelines folder")
        status = subprocess.run([*RADPIPE, "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    finally:
        output = _stop(process)
    [error] = [line for line in output.splitlines() if f"pipelines folder {folder} " in line]
    assert " ERROR " in error and "does not exist: every series will be stored unrouted" in error
    assert "RADPIPE_PIPELINES_DIR" in error
    assert status.stdout.splitlines()[0] == f"pipelines: 0 in {folder}"
    assert f"pipelines folder {folder} holds no pipeline" in status.stderr  # the node has made it, empty


def test_route_explain_says_why(tmp_path):
    write_pipeline(tmp_path / "pipelines", match={"Modality": "CT"})  # any CT, unlike the shipped demo
    write_pipeline(tmp_path / "pipelines", name="by-patient", match={"PatientID": {"regex": "^X"}})
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump({"pipelines": {"dir": str(tmp_path / "pipelines")}}))
    out = subprocess.run(
        [
            *RADPIPE,
            "route",
            "--explain",
            "--config",
            str(tmp_path / "radpipe.yaml"),
            str(DEID_HUMANS / "ctbrain1.dcm"),
            str(PYDICOM_FILES / "MR_small.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"{DEID_HUMANS / 'ctbrain1.dcm'}:",
        "  no match  by-patient v1: PatientID matches /^X/ failed (actual: ***)",  # never the patient's ID
        "  match     lung-nodule-demo v1",
        f"{PYDICOM_FILES / 'MR_small.dcm'}:",
        "  no match  by-patient v1: PatientID matches /^X/ failed (actual: ***)",
        "  no match  lung-nodule-demo v1: Modality == 'CT' failed (actual: MR)",
    ]


def test_validate_accepts_the_shipped_pipelines_and_reports_errors(tmp_path):
    ok = subprocess.run([*RADPIPE, "validate", str(REPO / "pipelines")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout
    assert "ok (lung-nodule-demo v1)" in ok.stdout

    bad = write_pipeline(tmp_path, Modality="CT", preprocess=[{"window": {"center": 0, "width": -1}}])
    out = subprocess.run([*RADPIPE, "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"{bad}:15:5: preprocess.0.window.width: Input should be greater than 0",
        f"{bad}:34:1: Modality: Extra inputs are not permitted",
    ]


def _unreadable(tmp_path):
    """{path: the reason route gives}: a missing file, a folder and a file that is not DICOM."""
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    return {
        tmp_path / "missing.dcm": "No such file or directory",
        tmp_path: "Is a directory",
        text: "not a DICOM file (no DICM prefix after the 128-byte preamble)",
    }


def test_route_reports_each_unreadable_file_in_one_line_and_explains_the_others(tmp_path):
    bad = _unreadable(tmp_path)
    mr = PYDICOM_FILES / "MR_small.dcm"
    files = [*bad, mr]
    out = subprocess.run(
        [*RADPIPE, "route", "--explain", *map(str, files)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stdout.splitlines() == [
        *(f"{path}: {reason}" for path, reason in bad.items()),
        f"{mr}:",
        "  no match  lung-nodule-demo v1: Modality == 'CT' failed (actual: MR)",
        "  no match  lung-nodule-seg-demo v1: Modality == 'CT' failed (actual: MR)",
    ]


def test_route_in_process_returns_1_for_an_unreadable_file(tmp_path, radpipe):
    write_pipeline(tmp_path / "pipelines")
    config = tmp_path / "radpipe.yaml"
    config.write_text(yaml.safe_dump({"pipelines": {"dir": str(tmp_path / "pipelines")}}))
    for path, reason in _unreadable(tmp_path).items():
        assert radpipe("route", "--config", str(config), str(path)) == (1, f"{path}: {reason}\n")


CONFIG_WITH_ERRORS = """\
node:
  port: 70000
  ae_title: RADPIPE
storage:
  min_free_mb: -1
colour: red
"""


def test_validate_reports_config_errors_at_line_and_column(tmp_path):
    config = tmp_path / "radpipe.yaml"
    config.write_text(CONFIG_WITH_ERRORS)
    out = subprocess.run([*RADPIPE, "validate", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"{config}:2:3: node.port: Input should be less than or equal to 65535",
        f"{config}:5:3: storage.min_free_mb: Input should be greater than or equal to 0",
        f"{config}:6:1: colour: Extra inputs are not permitted",
    ]


def test_config_errors_in_process_name_the_line_or_the_variable(tmp_path, monkeypatch, radpipe):
    config = tmp_path / "radpipe.yaml"
    config.write_text("metrics:\n  port: 9400\n  port: 9401\n")
    assert radpipe("validate", str(config)) == (1, f"{config}:3:3: duplicate key 'port'\n")

    config.write_text("node:\n  port: 11112\n  max_associations: 0\n")
    monkeypatch.setenv("RADPIPE_NODE_PORT", "eleven")  # wins over the file, so the error is the variable's
    code, out = radpipe("status", "--config", str(config))
    assert code == 1
    assert out.splitlines() == [
        "RADPIPE_NODE_PORT: node.port: Input should be a valid integer, unable to parse string as an integer",
        f"{config}:3:3: node.max_associations: Input should be greater than or equal to 1",
    ]
