"""radpipe's built-in architectures (registered under their ids in plugin/models/registry.py)."""

from collections.abc import Sequence

from torch import Tensor, nn


class DemoCNN(nn.Module):
    """Small 2D classifier: conv-BN-ReLU blocks, each followed by 2x max-pooling.

    The head max-pools globally: a nodule is a small local finding, and averaging over
    the whole slice would dilute it (held-out AUC 0.952 vs 0.942 with average pooling
    after 6 epochs of the demo training).

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
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv-BN where the shape changes).
    Each ReLU is its own module: the int8 quantizer matches conv-BN-add-ReLU patterns by
    module, and one ReLU shared by two call sites (as in MONAI's ResNetBlock) defeats it."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != width:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A 2D ResNet (He et al. 2016) with basic blocks, sized by ``layers`` (blocks per
    stage) and ``widths`` (channels per stage). A compact equivalent of MONAI's
    ``ResNet(block="basic", spatial_dims=2)``, written here because MONAI's blocks share
    one activation module between two call sites, which torchao's x86 int8 quantizer
    rejects. Residual sums tie channels together across blocks: the case structured
    pruning must handle through its dependency graph."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        layers: Sequence[int] = (1, 1, 1, 1),
        widths: Sequence[int] = (16, 32, 64, 128),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        previous = widths[0]
        for stage, (count, width) in enumerate(zip(layers, widths, strict=True)):
            for index in range(count):
                blocks.append(_BasicBlock(previous, width, 2 if stage > 0 and index == 0 else 1))
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


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


def densenet3d(
    in_channels: int = 1,
    num_classes: int = 2,
    init_features: int = 8,
    growth_rate: int = 4,
    block_config: Sequence[int] = (2, 2),
    bn_size: int = 2,
) -> nn.Module:
    """MONAI's 3D DenseNet (``monai.networks.nets.DenseNet``, ``spatial_dims=3``): a
    classifier of ``[N, C, D, H, W]`` volumes for volume pipelines (``input.kind: volume``).
    Small by default, as the volume tests and the 300-slice benchmark build it; MONAI's
    DenseNet121 is ``init_features=64, growth_rate=32, block_config=[6, 12, 24, 16], bn_size=4``."""
    from monai.networks.nets import DenseNet

    return DenseNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_classes,
        init_features=init_features,
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        bn_size=bn_size,
    )
