"""Structured pruning: whole channels leave the network, so the pruned model really has
fewer parameters and multiply-accumulates (unlike ``torch.nn.utils.prune`` masks).

torch-pruning's dependency graph finds every layer a removed channel touches (the next
conv's input, a batch norm, a residual sum, a DenseNet concatenation) and removes it
there too. Pruning is iterative: ``iterative_steps`` small steps, each followed by
fine-tuning, lose less accuracy than one big cut. Criteria:

- ``l1`` / ``l2``: weight magnitude (Li et al. 2017, "Pruning Filters for Efficient ConvNets");
- ``taylor``: first-order Taylor expansion of the loss, |weight x gradient| (Molchanov et al. 2019);
- ``slimming``: batch-norm scale, with an L1 penalty on the scales while fine-tuning so that
  unimportant channels shrink towards zero first (Liu et al. 2017, "Network Slimming").
"""

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from plugin.accel.data import Split
from plugin.accel.finetune import accumulate_gradients, finetune
from plugin.accel.recipe import Finetune, Prune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs}


def complexity(model: nn.Module, example: Tensor) -> Complexity:
    """Parameters and multiply-accumulates of one image's forward pass."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example[:1])
    model.train(was_training)
    return Complexity(params=int(params), macs=int(macs))


def _importance(criterion: str) -> object:
    import torch_pruning as tp

    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.BNScaleImportance()


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """The output layer keeps its width: one output per class (a classifier's last linear
    layer, a segmentation network's last convolution)."""
    layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    return layers[-1:]


@contextmanager
def _shared_prelu_frozen(model: nn.Module) -> Iterator[None]:
    """Trace the dependency graph with every single-weight PReLU's weight frozen.

    torch-pruning (1.6) infers an op's channel count from its last input, and a PReLU's one
    shared weight reaches the op broadcast through a reshape: the count comes out unknown,
    and a concatenation behind it (MONAI's UNet skip connections) fails to trace. A
    shared weight has no channels to prune, so the graph loses nothing without it.
    """
    shared = [m.weight for m in model.modules() if isinstance(m, nn.PReLU) and m.num_parameters == 1]
    for weight in shared:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        for weight in shared:
            weight.requires_grad_(True)


def prune(model: nn.Module, train: Split, recipe: Prune, tuning: Finetune, seed: int = 0) -> nn.Module:
    """A pruned, fine-tuned copy of ``model`` (the original is left untouched)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).train()
    example = train.images[:2]
    options = {
        "importance": _importance(recipe.importance),
        "pruning_ratio": recipe.ratio,
        "iterative_steps": recipe.iterative_steps,
        "ignored_layers": _output_layers(model),
        "round_to": recipe.round_to,
    }
    slimming = recipe.importance == "slimming"
    with _shared_prelu_frozen(model):
        if slimming:
            pruner = tp.pruner.BNScalePruner(model, example, reg=recipe.sparsity, **options)
        else:
            pruner = tp.pruner.MetaPruner(model, example, **options)

    def sparsify(m: nn.Module) -> None:
        pruner.regularize(m)

    regularize = sparsify if slimming else None
    if slimming:  # let the L1 penalty polarize the BN scales before the first cut
        finetune(
            model, train, recipe.finetune_epochs, tuning.batch_size, tuning.lr, seed, regularize, "sparsity training"
        )
    for step in range(1, recipe.iterative_steps + 1):
        if recipe.importance == "taylor":
            accumulate_gradients(model, train, tuning.batch_size)
        pruner.step()
        model.zero_grad(set_to_none=True)
        if slimming:
            pruner.update_regularizer()
        log.info("pruning step %d/%d: %s", step, recipe.iterative_steps, complexity(model, example))
        finetune(
            model,
            train,
            recipe.finetune_epochs,
            tuning.batch_size,
            tuning.lr,
            seed + step,
            regularize if step < recipe.iterative_steps else None,
            f"fine-tuning after pruning step {step}/{recipe.iterative_steps}",
        )
    return model.eval()


def describe(architecture: dict, model: nn.Module) -> dict:
    """The manifest's architecture entry for a pruned model: for the demo CNN, whose
    parameters list every block's width, the parameters alone describe it."""
    params = dict(architecture.get("params", {}))
    if architecture.get("id") == "demo-cnn":
        params["channels"] = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return {"id": architecture["id"], "params": params}
