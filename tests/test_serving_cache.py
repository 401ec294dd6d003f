"""The node's compile cache (plugin/models/compile_cache.py): a restarted node loads its
int8 program instead of compiling it, gets the same outputs, and refuses a package that
is not byte for byte what it wrote. And a starting node (plugin/app.py) listens before its
models are loaded: a job claimed meanwhile waits for its model; a model that cannot load
is logged and the node runs on."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry

from plugin.app import Node
from plugin.config import NodeConfig
from plugin.metrics import Metrics
from plugin.models.artifact import load_artifact, write_artifact
from plugin.models.compile_cache import CompileCache
from plugin.models.registry import build
from plugin.models.serving import convert_int8, exported_graph, observer_state, prepare_int8
from plugin.outputs.sr import read_measurement_report
from tests.conftest import DEMO_ARTIFACT, echo_ok, node_config, results, storescu, wait_for, write_pipeline

ARCHITECTURE = {"id": "demo-cnn", "params": {"in_channels": 1, "num_classes": 2, "channels": [8]}}
SHAPE = (1, 32, 32)
# a fresh process: loads the artifact with the cache, prints the metric's counts, saves its outputs
FRESH_LOAD = """
import sys, torch
from pathlib import Path
from prometheus_client import CollectorRegistry
from plugin.metrics import Metrics
from plugin.models.artifact import load_artifact
from plugin.models.compile_cache import CompileCache
metrics = Metrics(CollectorRegistry())
cache = CompileCache(Path(sys.argv[2]), metrics.model_compile_seconds)
artifact = load_artifact(Path(sys.argv[1]), torch.device("cpu"), compile_cache=cache)
torch.save(artifact.module(torch.load(sys.argv[3])), sys.argv[4])
for source in ("cache", "compile"):
    print(source, metrics.registry.get_sample_value("radpipe_model_compile_seconds_count", {"source": source}))
print("inductor", "torch._inductor" in sys.modules)  # a cache hit does without it (seconds to import)
"""


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo-cnn, statically quantized to int8 on random images: an artifact as
    ``radpipe optimize`` writes one, made in a second."""
    torch.manual_seed(0)
    module = build(ARCHITECTURE).eval()
    prepared = prepare_int8(exported_graph(module, "int8_static", torch.zeros((2, *SHAPE))), "int8_static")
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.rand((8, *SHAPE)))
    tensors = {**module.state_dict(), **observer_state(prepared)}
    convert_int8(prepared, "int8_static")  # as optimize checks it; starts torch.fx's tqdm monitor thread, here
    manifest = {
        "format": "module",
        "name": "tiny-int8",
        "architecture": ARCHITECTURE,
        "input": {"channels": 1, "height": SHAPE[1], "width": SHAPE[2], "dtype": "float32"},
        "classes": ["normal", "nodule"],
        "precision": "int8",
        "quantization": {"scheme": "int8_static", "buckets": [4]},  # one bucket: one compile each
    }
    return write_artifact(tmp_path_factory.mktemp("artifact") / "tiny-int8", {"weights.safetensors": tensors}, manifest)


def _counts(metrics: Metrics) -> dict[str, float | None]:
    sample = metrics.registry.get_sample_value
    return {s: sample("radpipe_model_compile_seconds_count", {"source": s}) for s in ("cache", "compile")}


def test_restart_loads_the_cached_program_and_refuses_an_altered_one(tmp_path, tiny_int8, caplog):
    images = torch.rand((6, *SHAPE))
    compiled = tmp_path / "compiled"
    metrics = Metrics(CollectorRegistry())
    cache = CompileCache(compiled, metrics.model_compile_seconds)
    first = load_artifact(tiny_int8, torch.device("cpu"), compile_cache=cache)
    assert _counts(metrics) == {"cache": 0.0, "compile": 1.0}
    with torch.inference_mode():
        fresh = first.module(images)
        # the program the node compiled without a cache, in process (torch.compile)
        assert torch.allclose(load_artifact(tiny_int8, torch.device("cpu")).module(images), fresh, atol=1e-4)
    (package,) = compiled.glob("*.pt2")

    # a restarted node: a fresh process, the same artifact and cache folder
    torch.save(images, tmp_path / "images.pt")
    run = [sys.executable, "-c", FRESH_LOAD, str(tiny_int8), str(compiled), str(tmp_path / "images.pt")]
    done = subprocess.run([*run, str(tmp_path / "cached.pt")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cache", "1.0", "compile", "0.0", "inductor", "False"]
    assert torch.equal(torch.load(tmp_path / "cached.pt"), fresh)

    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="plugin.models.compile_cache"):
        again = load_artifact(tiny_int8, torch.device("cpu"), compile_cache=cache)
    assert "does not match its recorded sha256" in caplog.text
    assert _counts(metrics) == {"cache": 0.0, "compile": 2.0}  # refused and compiled afresh, never loaded
    with torch.inference_mode():
        assert torch.equal(again.module(images), fresh)
    (record_file,) = compiled.glob("*.json")
    record = json.loads(record_file.read_text())
    assert CompileCache.identity(first.manifest, [4], SHAPE) == record["identity"]


def test_a_package_made_for_something_else_is_refused(tmp_path, caplog):
    cache = CompileCache(tmp_path)
    identity = CompileCache.identity({"name": "m"}, [1, 8], SHAPE)
    (tmp_path / "k.b1.pt2").write_bytes(b"package")
    other = {**identity, "torch": "2.0.0"}
    (tmp_path / "k.json").write_text(json.dumps({"identity": other, "sha256": "0" * 64}))
    with caplog.at_level(logging.WARNING, logger="plugin.models.compile_cache"):
        assert cache._load("k", identity) is None
    assert "made for something else" in caplog.text


def _tiny_pipeline(directory: Path, artifact: Path) -> Path:
    """The demo pipeline on the tiny int8 model (32x32 input, a batch bucket of 4)."""
    preprocess = [{"window": {"center": -600, "width": 1500}}, {"resize": [32, 32]}]
    return write_pipeline(directory, preprocess=preprocess, model={"artifact": str(artifact), "batch_size": 4})


def test_a_node_listens_and_stores_while_its_model_loads(tmp_path, tiny_int8, demo_study, dcmtk):
    """Cold start (issue 15): the node answers C-ECHO and C-STORE while its int8 model is
    still being compiled (an empty compile cache: seconds), a job claimed meanwhile waits for
    the model instead of failing, and its SR is written once the model is ready."""
    _tiny_pipeline(tmp_path / "pipelines", tiny_int8)
    node = Node(NodeConfig.model_validate(node_config(tmp_path)), CollectorRegistry())
    sample = node.metrics.registry.get_sample_value
    try:
        node.start(wait_ready=False)
        assert echo_ok(node.port)
        series = demo_study["Demo chest CT, nodules"][:4]
        assert storescu(node.port, *series).returncode == 0
        assert not node.ready.is_set()  # acknowledged (fsync'd, journaled) before the model is ready
        assert sample("radpipe_instances_received_total", {"calling_ae": "STORESCU"}) == 4
        running = wait_for(lambda: [j for j in node.journal.jobs() if j.status == "running"], what="a claimed job")
        assert not node.ready.is_set(), "the model was ready before the job was claimed: nothing waited"
        [sr] = wait_for(lambda: results(node.results_dir), timeout=300, what="the SR")
        assert node.ready.wait(60)
        # the runner writes the SR durably, then marks the job done: wait for the second
        [job] = wait_for(lambda: [j for j in node.journal.jobs() if j.status != "running"], what="the job ended")
        assert (job.id, job.status, job.attempts) == (running[0].id, "done", 1)
        [finding] = read_measurement_report(pydicom.dcmread(sr))
        assert finding.algorithm_name == "lung-nodule-demo" and len(finding.source_sop_instance_uids) == 4
        assert sample("radpipe_model_compile_seconds_count", {"source": "compile"}) == 1  # waited, not loaded twice
    finally:
        node.stop()


def test_a_node_says_it_is_ready_only_once_it_has_settled(tmp_path, caplog):
    """``radpipe serve`` hides what loading made from the garbage collector (``settle``). That
    full collection holds every association for a quarter of a second; it used to run after
    the node said it was ready, so the first series received waited for it (benchmarks/README.md,
    fourteenth pass). Now it runs with the models loaded and before the ready line."""
    caplog.set_level(logging.INFO, logger="plugin.app")
    write_pipeline(tmp_path / "pipelines")
    node = Node(NodeConfig.model_validate(node_config(tmp_path)), CollectorRegistry())
    seen = []

    def settle() -> None:
        models = [
            s.labels["model"]
            for m in node.metrics.registry.collect()
            if m.name == "radpipe_model_info"
            for s in m.samples
        ]
        seen.append((node.ready.is_set(), " ready: " in caplog.text, models))

    try:
        node.start(wait_ready=False, settle=settle)
        node.wait_ready(120)
        assert seen == [(False, False, ["lung-nodule-demo"])]
        assert node.ready.is_set() and " ready: " in caplog.text
    finally:
        node.stop()


def test_a_model_that_cannot_load_is_logged_and_the_node_runs_on(tmp_path, demo_study, dcmtk, caplog):
    artifact = tmp_path / "broken"
    shutil.copytree(DEMO_ARTIFACT, artifact)
    weights = next(artifact.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])  # no longer the bytes its manifest's hash names
    write_pipeline(tmp_path / "pipelines", model={"artifact": str(artifact), "batch_size": 8})
    node = Node(NodeConfig.model_validate(node_config(tmp_path)), CollectorRegistry())
    try:
        with caplog.at_level(logging.ERROR, logger="plugin.app"):
            node.start()
        [line] = [r.getMessage() for r in caplog.records if "model not loaded" in r.getMessage()]
        assert line.startswith("pipeline lung-nodule-demo: model not loaded: ")
        assert echo_ok(node.port)
        assert storescu(node.port, *demo_study["Demo chest CT, no nodules"][:2]).returncode == 0
        [job] = wait_for(lambda: [j for j in node.journal.jobs() if j.status == "failed"], what="the failed job")
        assert "sha256" in (job.error or "")
    finally:
        node.stop()


def test_serve_with_an_invalid_pipeline_exits_1_with_its_errors(tmp_path):
    """The pipelines are read after the node listens, and an invalid one still stops
    ``radpipe serve`` with exit 1 and its ``file:line`` errors, as when they were read first."""
    path = write_pipeline(tmp_path / "pipelines", match={"Modalty": "CT"})
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(node_config(tmp_path)))
    serve = [sys.executable, "-m", "plugin", "serve", "--config", str(tmp_path / "radpipe.yaml")]
    done = subprocess.run(serve, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{path}:" in done.stdout and "match.Modalty: unknown DICOM keyword 'Modalty'" in done.stdout
    assert "listening on" in done.stderr
