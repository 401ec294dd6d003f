"""Warm models: each artifact is loaded once and kept for every later job.

The pool is keyed by artifact folder, model hash and device, so an artifact replaced
on disk is loaded anew on its next use. Until the new one has loaded (and passed its
hash check), the previous one keeps serving: a half-copied artifact never stops a
pipeline that was working. A model whose recorded input the pipeline's preprocessing
does not yield is refused for that pipeline (an error, the reload refused), however it
came to be there.
"""

import logging
import threading
from pathlib import Path

import torch

from plugin.metrics import Metrics
from plugin.models.artifact import Artifact, ArtifactError, load_artifact, model_file, read_manifest
from plugin.models.compile_cache import CompileCache
from plugin.models.device import select_device
from plugin.models.inputspec import input_mismatch
from plugin.pipeline import Pipeline

log = logging.getLogger(__name__)


class ModelPool:
    """``compile_dir``: where the node keeps its compiled int8 programs
    (plugin/models/compile_cache.py); None compiles them anew at every load."""

    def __init__(self, metrics: Metrics, compile_dir: Path | None = None) -> None:
        self._metrics = metrics
        self._compile_cache = None if compile_dir is None else CompileCache(compile_dir, metrics.model_compile_seconds)
        # A key's entries in _current and _checked change only under its lock in _loading;
        # _lock, held briefly, guards _loading, _info_labels and _fitting.
        self._lock = threading.Lock()
        self._loading: dict[tuple[Path, str], threading.Lock] = {}  # (folder, device) -> held while checked/loaded
        self._current: dict[tuple[Path, str], Artifact] = {}  # (folder, device) -> loaded artifact
        self._checked: dict[tuple[Path, str], tuple] = {}  # (folder, device) -> files as last verified
        self._info_labels: dict[str, tuple[str, ...]] = {}  # pipeline -> its model_info labels
        self._fitting: set[tuple[str, str]] = set()  # (pipeline sha256, model sha256) whose input fits

    def get(self, pipeline: Pipeline) -> Artifact:
        """The pipeline's model, loaded on first use or when its artifact changed.
        Hashing and compiling take seconds (an int8 artifact after a reload), so each
        artifact has its own lock: only the pipelines of that artifact wait for it."""
        directory = pipeline.artifact_dir
        device = select_device(pipeline.model.device)
        key = (directory, str(device))
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            current = self._current.get(key)
            files = _fingerprint(directory)
            if current is not None and self._checked.get(key) == files:
                self._check_input(pipeline, current)
                self._set_info(pipeline, current)
                return current  # unchanged since its hashes were checked: no re-hash per job
            try:
                manifest = read_manifest(directory)
                if current is None or current.sha256 != manifest["files"][model_file(manifest)]:
                    loaded = load_artifact(directory, device, manifest, self._compile_cache)
                    self._check_input(pipeline, loaded)
                    current = self._current[key] = loaded
                    log.info(
                        "loaded model %s (sha256 %s, %s) on %s",
                        directory.name,
                        current.sha256[:12],
                        current.precision,
                        current.device,
                    )
                self._checked[key] = files
            except ArtifactError as e:
                if current is None:
                    raise
                log.error(
                    "model %s changed but cannot be loaded (%s); still using sha256 %s",
                    directory,
                    e,
                    current.sha256[:12],
                )
            self._check_input(pipeline, current)
            self._set_info(pipeline, current)
        return current

    def _set_info(self, pipeline: Pipeline, artifact: Artifact) -> None:
        labels = (
            pipeline.name,
            str(artifact.manifest.get("name", artifact.path.name)),
            artifact.precision,
            artifact.device.type,
            str(artifact.manifest.get("sparsity", 0.0)),
        )
        with self._lock:  # a pipeline whose artifact changed in a reload may come here from two keys' locks
            previous = self._info_labels.get(pipeline.name)
            if previous == labels:
                return
            if previous is not None:
                self._metrics.model_info.remove(*previous)
            self._metrics.model_info.labels(*labels).set(1)
            self._info_labels[pipeline.name] = labels

    def _check_input(self, pipeline: Pipeline, artifact: Artifact) -> None:
        """Refuse a model whose recorded input the pipeline does not feed; what fits is
        remembered (working the preprocessing's output shape out takes milliseconds)."""
        key = (pipeline.sha256, artifact.sha256)
        with self._lock:
            if key in self._fitting:
                return
        problem = input_mismatch(artifact.input, pipeline)
        if problem is not None:
            raise ArtifactError(f"{artifact.path} cannot serve pipeline {pipeline.name}: {problem}")
        with self._lock:
            self._fitting.add(key)

    @staticmethod
    def infer(artifact: Artifact, batch: torch.Tensor) -> torch.Tensor:
        """Logits for one batch, computed on the model's device, returned on the CPU.
        On CUDA the batch is copied from pinned memory, asynchronously (a DMA transfer
        instead of a staged copy through pageable memory)."""
        device = artifact.device
        if device.type == "cuda":
            batch = batch.pin_memory()
        with torch.inference_mode():
            return artifact.module(batch.to(device, non_blocking=True)).float().cpu()


def _fingerprint(directory: Path) -> tuple:
    """Identity of every file in an artifact folder (inode, mtime, size): a replaced or
    rewritten file changes it, so the hashes are checked again only then."""
    try:
        stats = [(p.name, p.stat()) for p in directory.iterdir()]
    except OSError:
        return ()
    return tuple(sorted((name, s.st_ino, s.st_mtime_ns, s.st_size) for name, s in stats))
