"""The serving contract for models that do not meet it by themselves.

The pool calls every model the same way: a float32 batch of any size in, float32 logits
``[N, classes]`` out. An imported program may instead have been exported for one batch
size, take float16, or return a tuple whose first item is the logits; this wraps it so
that the pool, the runner and ``radpipe optimize``'s evaluation never need to know.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from plugin.models.inputspec import InputSpec


class SpecAdapter(nn.Module):
    """Runs ``run`` (a module, or a function such as an ONNX Runtime session's) as
    ``spec`` says: chunks of ``spec.batch`` images (the last padded with zeros and cut
    back) when the model takes only that batch size, cast to ``spec.dtype``."""

    def __init__(self, run: Callable[[Tensor], object], spec: InputSpec) -> None:
        super().__init__()
        self.run = run  # a module assigned here is a submodule: its parameters and device show
        self.spec = spec

    def _logits(self, batch: Tensor) -> Tensor:
        out = self.run(batch.to(self.spec.torch_dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"the model returned a {type(out).__name__}, not a tensor of logits")
        return out.float()

    def forward(self, images: Tensor) -> Tensor:
        size = self.spec.batch
        if size is None:
            return self._logits(images)
        parts = []
        for chunk in images.split(size):
            n = len(chunk)
            padded = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))]) if n < size else chunk
            parts.append(self._logits(padded)[:n])
        return torch.cat(parts)
