"""Choosing the device a model runs on, in one place, with the fallback logged."""

import logging

import torch

log = logging.getLogger(__name__)


def select_device(preference: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU falls back to CPU
    with a warning rather than failing every job."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        log.warning("model.device is 'cuda' but no CUDA device is available; using the CPU")
    return torch.device("cpu")
