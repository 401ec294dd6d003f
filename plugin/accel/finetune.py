"""Fine-tuning: recovers the accuracy that pruning (or fake quantization) takes away,
on the recipe's training images (or a segmentation model's windows), with the pipeline's
own preprocessing already applied."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugin.accel.data import Split
from plugin.accel.progress import progress


def _flip(images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random left-right flips: a chest slice's label does not depend on the side, and a
    window's per-voxel labels flip with it."""
    flip = torch.rand(len(images), generator=generator) < 0.5

    def flipped(x: Tensor) -> Tensor:
        return torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)

    return flipped(images), flipped(labels) if labels.dim() > 1 else labels


def loss_of(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of class logits for image labels ``[N]``; for per-voxel labels
    ``[N, *spatial]`` Dice + cross-entropy, the loss the demo segmentation model trains with
    (small lesions would drown in background voxels under cross-entropy alone)."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels)
    from plugin.demo.train_seg import segmentation_loss

    return segmentation_loss(logits, labels[:, None].long())


def finetune(
    model: nn.Module,
    train: Split,
    epochs: float,
    batch_size: int,
    lr: float,
    seed: int = 0,
    after_backward: Callable[[nn.Module], None] | None = None,
    what: str = "fine-tuning",
) -> nn.Module:
    """Train ``model`` in place for ``epochs`` (fractions allowed) with AdamW and a cosine
    schedule. ``after_backward`` may edit gradients (network slimming adds its L1 term there)."""
    steps = round(epochs * ((len(train) + batch_size - 1) // batch_size))
    if steps <= 0:
        return model
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    order = torch.randperm(len(train), generator=generator)
    for step in progress(range(steps), steps, what):
        start = (step * batch_size) % len(train)
        if start + batch_size > len(train):
            order = torch.randperm(len(train), generator=generator)
            start = 0
        index = order[start : start + batch_size]
        images, labels = _flip(train.images[index], train.labels[index], generator)
        loss = loss_of(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        optimizer.step()
        schedule.step()
    model.eval()
    return model


def accumulate_gradients(model: nn.Module, train: Split, batch_size: int, batches: int = 8) -> None:
    """Gradients of the loss over a few batches, for Taylor importance (|weight x gradient|)."""
    model.eval()  # BN statistics stay as they are; only the gradients are wanted
    model.zero_grad()
    for start in range(0, min(len(train), batches * batch_size), batch_size):
        images, labels = train.images[start : start + batch_size], train.labels[start : start + batch_size]
        loss_of(model(images), labels).backward()
