"""Model architectures an artifact can name.

An artifact's manifest stores ``{"id": ..., "params": {...}}``; :func:`build` turns that
back into a module. Only classes registered here can be built, so loading an artifact
never executes code that came with it.
"""

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(arch_id: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[arch_id] = factory
        return factory

    return add


def build(spec: dict[str, Any]) -> nn.Module:
    """Build the module described by a manifest's ``architecture`` entry."""
    arch_id = spec.get("id")
    if arch_id not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch_id!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch_id](**spec.get("params", {}))


@register("demo-cnn")
class DemoCNN(nn.Module):
    """Small 2D classifier: conv-BN-ReLU blocks, each followed by 2x max-pooling.

    ``channels`` lists every block's width so that a pruned copy (fewer channels per
    block) is described by its parameters alone.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
