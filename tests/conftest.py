"""Shared fixtures: a node on free loopback ports, real DICOM files, dcmtk helpers."""

import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pydicom
import pytest
import yaml
from prometheus_client import CollectorRegistry

from plugin.app import Node
from plugin.cli import main
from plugin.config import NodeConfig
from plugin.journal import Journal
from tests.postgres import (  # noqa: F401 (fixtures)
    JOURNAL_MODE,
    JOURNAL_MODES,
    own_postgres,
    postgres_server,
    postgres_url,
    session_server_stopped,
    suite_journal_url,
)

if TYPE_CHECKING:
    from plugin.outputs.sr import ReportedFinding

REPO = Path(__file__).resolve().parent.parent
DEMO_PIPELINE = REPO / "pipelines" / "lung-nodule-demo.yaml"
DEMO_ARTIFACT = REPO / "pipelines" / "models" / "lung-nodule-demo"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA = Path(__import__("data_store").__file__).parent / "data"
DEID_HUMANS = Path(__import__("deid_data").__file__).parent / "data" / "humans"

# dcmtk waits ~40 ms per message for a delayed ACK unless told to set TCP_NODELAY.
os.environ["TCP_NODELAY"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): the test is about the SQLite journal itself; skipped in the PostgreSQL mode",
    )
    if JOURNAL_MODE not in JOURNAL_MODES:
        raise pytest.UsageError(f"RADPIPE_TEST_JOURNAL={JOURNAL_MODE!r}: give one of {', '.join(JOURNAL_MODES)}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In the PostgreSQL mode, a test about SQLite itself is skipped with its reason (it
    already ran in the default mode), not run on a journal it is not about."""
    if JOURNAL_MODE != "postgresql":
        return
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {marker.args[0]}"))


@pytest.fixture(scope="session", autouse=True)
def torchs_own_deprecation() -> None:
    """torch 2.13 raises one DeprecationWarning on our behalf: inductor's int8 lowering (radpipe
    optimize, an int8 artifact loaded) imports torch/utils/mkldnn.py, whose decorators use
    ``torch.jit.script_method``. A fixed text about torch's code, carrying nothing the node
    handles. Asserted here, where it is raised and exactly once per process (the module stays
    imported), so that every other warning stays an error in every test."""
    with pytest.warns(DeprecationWarning) as caught:
        import torch.utils.mkldnn  # noqa: F401
    assert caught.list  # one per decorated method of that module, every one of them this
    for warning in caught.list:
        assert str(warning.message).startswith("`torch.jit.script_method` is deprecated.")
        assert Path(warning.filename).as_posix().endswith("torch/jit/_script.py")


@pytest.fixture(autouse=True)
def strict_pydicom() -> Iterator[None]:
    """What radpipe writes must be valid: pydicom raises on invalid values it writes."""
    original = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.writing_validation_mode = original


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test must stop the threads it started (pynetdicom's may take a moment)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        time.sleep(0.1)
    pytest.fail(f"threads left running: {[t.name for t in leaked]}")


@pytest.fixture(autouse=True)
def no_leaked_log_handlers() -> Iterator[None]:
    """A test must not leave handlers on the root logger: one that points at a test's
    captured stderr turns every later record into a "--- Logging error ---" traceback."""
    before = list(logging.getLogger().handlers)
    yield
    after = list(logging.getLogger().handlers)
    if after != before:
        logging.getLogger().handlers[:] = before
        pytest.fail(f"root logger handlers changed: {before} -> {after}")


@pytest.fixture
def radpipe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """``radpipe ARGS`` in this process: exit status and what it printed. Logging is left to
    pytest (main would point the process's handlers at this test's soon closed stderr)."""
    monkeypatch.setattr("plugin.cli.configure_logging", lambda level, log_format: None)

    def run(*argv: str) -> tuple[int, str]:
        code = main(["--log-level", "DEBUG", *argv])
        return code, capsys.readouterr().out

    return run


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same one twice in a session (the kernel may
    hand out a just-closed port again, e.g. for a node and its metrics)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def write_pipeline(directory: Path, source: Path = DEMO_PIPELINE, **changes: object) -> Path:
    """Copy a pipeline into ``directory`` with an absolute artifact path and changes."""
    data = yaml.safe_load(source.read_text())
    data["model"]["artifact"] = str((source.parent / data["model"]["artifact"]).resolve())
    data["completion"]["quiet_seconds"] = 1
    data.update(changes)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{data['name']}.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def node_config(tmp_path: Path, **sections: dict) -> dict:
    """A node config for tests: free ports, everything under ``tmp_path``; in the
    PostgreSQL mode, a fresh database for its journal unless ``journal`` is given."""
    config: dict = {
        "node": {"port": free_port()},
        "metrics": {"port": free_port()},
        "storage": {"dir": str(tmp_path / "data"), "min_free_mb": 1},
        "pipelines": {"dir": str(tmp_path / "pipelines")},
        "dispatch": {"tries": 3, "backoff_seconds": 0.1},
    }
    if "journal" not in sections and (url := suite_journal_url()) is not None:
        config["journal"] = {"url": url}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def shared_journal(journal_url: str, pacs_port: int) -> dict[str, dict]:
    """The sections of nodes that share a (PostgreSQL) journal: the journal, and dcmtk's
    storescp on ``pacs_port`` (AE title PACS) as destination ``pacs``."""
    return {
        "journal": {"url": journal_url},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
    }


def write_node_config(tmp_path: Path, **sections: dict) -> tuple[Path, dict]:
    """:func:`node_config` written to ``tmp_path/<node.id>.yaml``, for a node process of its
    own (:func:`serve`): the file and the config (its ``node.port`` is the one to serve on)."""
    config = node_config(tmp_path, **sections)
    path = tmp_path / f"{config['node']['id']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start an in-process node (fresh metrics registry); stopped after the test."""
    nodes: list[Node] = []

    def start(**sections: dict) -> Node:
        if not (tmp_path / "pipelines").exists():
            write_pipeline(tmp_path / "pipelines")
        node = Node(NodeConfig.model_validate(node_config(tmp_path, **sections)), CollectorRegistry())
        nodes.append(node)  # stopped at teardown even if it fails half-way through starting
        node.start()
        return node

    yield start
    for node in nodes:
        node.stop()


def open_journal(folder: Path) -> Journal:
    """A new, empty journal of the test's own, as a node of the suite's mode would have: a
    fresh database in the PostgreSQL mode, else ``journal.sqlite`` in ``folder``."""
    return Journal(suite_journal_url() or folder / "journal.sqlite")


# What reading a journal that a node writes may raise before the node has created it.
JOURNAL_ERRORS = (sqlite3.Error, psycopg.Error)


def read_journal(location: Path | str, sql: str) -> list[tuple]:
    """The rows of ``sql`` in a journal another process writes, read as an admin would
    (``NodeConfig.journal_location``: a SQLite file, opened read-only, or a PostgreSQL URL)."""
    if isinstance(location, str):
        with psycopg.connect(location, autocommit=True) as conn:
            return conn.execute(sql).fetchall()
    with closing(sqlite3.connect(f"file:{location}?mode=ro", uri=True, timeout=5)) as db:
        return db.execute(sql).fetchall()


def wait_for(condition: Callable[[], object], timeout: float = 60, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def results(results_dir: Path) -> list[Path]:
    return sorted(results_dir.glob("*/*.dcm"))


def series_findings(results_dir: Path, series: list[list[Path]]) -> "list[ReportedFinding]":
    """Each series' one finding, from the SRs in ``results_dir``, which must report on
    exactly these series, each on its own images."""
    from plugin.outputs.sr import read_measurement_report

    reports = {}
    for path in results(results_dir):
        [finding] = read_measurement_report(pydicom.dcmread(path))
        reports[frozenset(finding.source_sop_instance_uids)] = finding
    expected = [frozenset(str(pydicom.dcmread(p).SOPInstanceUID) for p in files) for files in series]
    assert set(reports) == set(expected)
    return [reports[uids] for uids in expected]


def storescu(port: int, *files: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", *options, "-aec", "RADPIPE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


@pytest.fixture(scope="session")
def demo_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A synthetic study: a positive and a negative 24-slice CT series."""
    from plugin.demo.series import synthetic_study

    return synthetic_study(tmp_path_factory.mktemp("study"), seed=7)


@pytest.fixture(scope="session")
def dcmtk() -> None:
    for tool in ("storescu", "echoscu", "dciodvfy"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed: run `make test`, which installs dcmtk and dicom3tools")


@pytest.fixture
def storescp(tmp_path: Path, dcmtk: None) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp as a destination (AE title PACS), listening: its port, and the
    folder it writes each object it receives to."""
    port, folder = free_port(), tmp_path / "pacs"
    folder.mkdir()
    process = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), timeout=10, what="storescp listening")
        yield port, folder
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def with_new_uids(paths: list[Path], out_dir: Path) -> list[Path]:
    """Copies of one series under fresh Study/Series/SOP Instance UIDs: "the next study"."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out_dir / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(copies[-1])
    return copies


def _openssl(command: str) -> None:
    subprocess.run(["openssl", *command.split()], check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server and a client certificate it signed, and a rogue self-signed client."""
    d = tmp_path_factory.mktemp("pki")
    for name in ("ca", "rogue"):
        _openssl(
            f"req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={name} -keyout {d}/{name}.key -out {d}/{name}.crt"
        )
    for name in ("server", "client"):
        _openssl(f"req -newkey rsa:2048 -nodes -subj /CN={name} -keyout {d}/{name}.key -out {d}/{name}.csr")
        _openssl(
            f"x509 -req -in {d}/{name}.csr -CA {d}/ca.crt -CAkey {d}/ca.key -CAcreateserial -days 2 -out {d}/{name}.crt"
        )
    return d


def echo_ok(port: int) -> bool:
    return subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(port)], capture_output=True).returncode == 0


def serve(config_path: Path, port: int, log_path: Path) -> subprocess.Popen:
    """``python -m plugin serve`` as its own process, once it answers C-ECHO."""
    import sys

    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "plugin", "serve", "--config", str(config_path)], stdout=log, stderr=log
        )
    deadline = time.monotonic() + 60
    while not echo_ok(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"node did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return process
