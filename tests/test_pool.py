"""The warm model pool: one artifact's (re)load never holds up the pipelines of another."""

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from plugin.metrics import Metrics
from plugin.models.artifact import Artifact
from plugin.models.pool import ModelPool
from plugin.pipeline import load_pipeline
from tests.conftest import DEMO_ARTIFACT, write_pipeline

LARGE = 512 * 2**20  # hashing it takes far longer than a warm `get` (about 0.4 s against microseconds)


def _with_large_file(artifact: Path) -> Path:
    """A copy of the demo artifact whose manifest also lists a large (sparse) file, so
    that checking its hashes is really slow."""
    shutil.copytree(DEMO_ARTIFACT, artifact)
    with (artifact / "large.bin").open("wb") as f:
        f.truncate(LARGE)
    digest = hashlib.sha256()
    for _ in range(LARGE // 2**20):
        digest.update(bytes(2**20))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["large.bin"] = digest.hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    return artifact / "large.bin"


def _open_by_this_process(path: Path) -> bool:
    """Whether some thread of this process has ``path`` open (read from /proc)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
        except OSError:  # closed since listed
            continue
    return False


def test_a_slow_load_does_not_stall_another_pipeline(tmp_path):
    large = _with_large_file(tmp_path / "slow-artifact")
    slow = load_pipeline(write_pipeline(tmp_path / "p", name="slow", model={"artifact": str(large.parent)}))
    warm = load_pipeline(write_pipeline(tmp_path / "p", name="warm", model={"artifact": str(DEMO_ARTIFACT)}))
    pool = ModelPool(Metrics(CollectorRegistry()))
    pool.get(warm)

    loaded: list[Artifact] = []
    loader = threading.Thread(target=lambda: loaded.append(pool.get(slow)), name="slow-load")
    loader.start()
    try:
        while not _open_by_this_process(large):  # polled tightly: the hash check lasts well under a second
            assert loader.is_alive(), "the slow artifact loaded before its hash check was seen"
            time.sleep(0.001)
        artifact = pool.get(warm)
        # The other pipeline got its model while the slow artifact was still being hashed.
        assert _open_by_this_process(large) and not loaded
        assert artifact.path == DEMO_ARTIFACT.resolve()
    finally:
        loader.join(120)
    [artifact] = loaded
    assert artifact.path == large.parent.resolve()
