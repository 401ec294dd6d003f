"""Warm models: each artifact is loaded once and kept for every later job."""

import logging
import threading
from pathlib import Path

import torch

from plugin.metrics import Metrics
from plugin.models.artifact import Artifact, load_artifact, read_manifest
from plugin.models.device import select_device
from plugin.pipeline import Pipeline

log = logging.getLogger(__name__)


class ModelPool:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._loaded: dict[tuple[Path, str, str], Artifact] = {}

    def get(self, pipeline: Pipeline) -> Artifact:
        """The pipeline's model, loaded on first use. The key includes the weights' hash,
        so a replaced artifact is loaded anew while running jobs keep the old one."""
        directory = pipeline.artifact_dir
        device = select_device(pipeline.model.device)
        weights_hash = read_manifest(directory)["files"]["weights.safetensors"]
        key = (directory, weights_hash, str(device))
        with self._lock:
            artifact = self._loaded.get(key)
            if artifact is None:
                artifact = load_artifact(directory, device)
                self._loaded[key] = artifact
                log.info(
                    "loaded model %s (sha256 %s, %s) on %s for pipeline %s",
                    directory.name,
                    weights_hash[:12],
                    artifact.precision,
                    device,
                    pipeline.name,
                )
                self._metrics.model_info.labels(
                    pipeline.name,
                    artifact.manifest.get("name", directory.name),
                    artifact.precision,
                    device.type,
                    str(artifact.manifest.get("sparsity", 0.0)),
                ).set(1)
        return artifact

    @staticmethod
    def infer(artifact: Artifact, batch: torch.Tensor) -> torch.Tensor:
        """Logits for one batch, computed on the model's device, returned on the CPU."""
        device = next(artifact.module.parameters()).device
        with torch.inference_mode():
            return artifact.module(batch.to(device, non_blocking=True)).float().cpu()
