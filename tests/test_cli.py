"""The command line, run as a user runs it: subprocesses through both entry points."""

import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import DEID_HUMANS, PYDICOM_FILES, REPO, free_port, node_config, write_pipeline

RADPIPE = [os.path.join(os.path.dirname(sys.executable), "radpipe")]
MODULE = [sys.executable, "-m", "plugin"]


def _serve(entry, tmp_path, env_port):
    config = node_config(tmp_path)
    del config["node"]["port"]  # given through the environment instead
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    write_pipeline(tmp_path / "pipelines")
    env = {**os.environ, "RADPIPE_NODE_PORT": str(env_port)}
    process = subprocess.Popen(
        [*entry, "serve", "--config", str(tmp_path / "radpipe.yaml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        echo = subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(env_port)], capture_output=True)
        if echo.returncode == 0:
            return process
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    process.kill()
    raise AssertionError("node did not answer C-ECHO within 60 s")


@pytest.mark.parametrize("entry", [RADPIPE, MODULE], ids=["radpipe", "python-m-plugin"])
def test_serve_answers_echo_and_demo_reports_findings(entry, tmp_path, dcmtk):
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
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert f"DICOM node RADPIPE listening on 127.0.0.1:{port}" in output


def test_route_explain_says_why(tmp_path):
    write_pipeline(tmp_path / "pipelines")
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
        "  match     lung-nodule-demo v1",
        f"{PYDICOM_FILES / 'MR_small.dcm'}:",
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
        f"{bad}:13:5: preprocess.0.window.width: Input should be greater than 0",
        f"{bad}:32:1: Modality: Extra inputs are not permitted",
    ]
