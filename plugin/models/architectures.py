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


@register("resnet")
def resnet(
    in_channels: int = 1,
    num_classes: int = 2,
    layers: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (16, 32, 64, 128),
    block: str = "basic",
) -> nn.Module:
    """MONAI's 2D ResNet (``monai.networks.nets.ResNet``), the field's reference zoo;
    a stride-2 stem keeps 128x128 inputs cheap."""
    from monai.networks.nets import ResNet

    return ResNet(
        block=block,
        layers=list(layers),
        block_inplanes=list(widths),
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_stride=2,
        num_classes=num_classes,
    )


@register("densenet")
def densenet(
    in_channels: int = 1,
    num_classes: int = 2,
    init_features: int = 16,
    growth_rate: int = 8,
    block_config: Sequence[int] = (2, 2, 2),
    bn_size: int = 2,
) -> nn.Module:
    """MONAI's 2D DenseNet (``monai.networks.nets.DenseNet``): concatenating blocks, the
    hard case for structured pruning (a removed channel must go from every later input)."""
    from monai.networks.nets import DenseNet

    return DenseNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        init_features=init_features,
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        bn_size=bn_size,
    )
