"""The one place an architecture id becomes a module.

An artifact of format ``module`` names its architecture as ``{"id": ..., "params": {...}}``
and carries only tensors; :func:`build` turns the id into code that is already installed
here, so loading an artifact never runs code that came with it (DESIGN invariant 9). An
id is one of:

- radpipe's built-ins (``demo-cnn``, ``resnet``, ``densenet``, ``densenet3d``: plugin/models/architectures.py);
- an entry point of an installed package in the group ``radpipe.architectures``, naming a
  factory ``(**params) -> nn.Module`` (a class or a function), e.g. in its pyproject.toml::

      [project.entry-points."radpipe.architectures"]
      nodule-net = "nodule_nets:NoduleNet"

- ``monai.networks.nets.<Name>``: a network class that MONAI exports from
  ``monai.networks.nets`` (what a MONAI bundle's ``network_def`` names).

The built-ins are seeded here rather than declared as entry points of radpipe itself, so
that a source checkout that was never (re)installed still finds them; a package cannot
replace them. Entry points are imported only when their id is asked for, so a broken
plugin package breaks only the artifacts that name it.
"""

from collections.abc import Callable
from importlib import metadata
from typing import Any

from torch import nn

from plugin.models.architectures import DemoCNN, ResNet, densenet, densenet3d

GROUP = "radpipe.architectures"
MONAI_NETS = "monai.networks.nets."

Factory = Callable[..., nn.Module]

BUILT_IN: dict[str, Factory] = {"demo-cnn": DemoCNN, "resnet": ResNet, "densenet": densenet, "densenet3d": densenet3d}


class UnknownArchitecture(ValueError):
    """No built-in, entry point or MONAI network has this id."""


def _entry_points() -> dict[str, list[metadata.EntryPoint]]:
    found: dict[str, list[metadata.EntryPoint]] = {}
    for entry in metadata.entry_points(group=GROUP):
        found.setdefault(entry.name, []).append(entry)
    return found


def known() -> list[str]:
    """Every id :func:`factory` accepts, except the MONAI networks (``monai.networks.nets.<Name>``)."""
    return sorted(BUILT_IN.keys() | _entry_points().keys())


def _monai(name: str) -> Factory | None:
    from monai.networks import nets

    network = getattr(nets, name, None) if name.isidentifier() and not name.startswith("_") else None
    if isinstance(network, type) and issubclass(network, nn.Module):
        return network
    return None


def _unknown(arch_id: object) -> UnknownArchitecture:
    return UnknownArchitecture(
        f"unknown architecture {arch_id!r}; known: {', '.join(known())} (and {MONAI_NETS}<Name>)"
    )


def factory(arch_id: str) -> Factory:
    """The factory registered under ``arch_id``; :class:`UnknownArchitecture` if none is."""
    if arch_id in BUILT_IN:
        return BUILT_IN[arch_id]
    if arch_id.startswith(MONAI_NETS):
        network = _monai(arch_id.removeprefix(MONAI_NETS))
        if network is None:
            raise _unknown(arch_id)
        return network
    entries = _entry_points().get(arch_id, [])
    if not entries:
        raise _unknown(arch_id)
    if len(entries) > 1:
        sources = ", ".join(f"{e.value} ({e.dist.name if e.dist else 'unknown package'})" for e in entries)
        raise UnknownArchitecture(f"architecture {arch_id!r} is published by more than one package: {sources}")
    loaded = entries[0].load()
    if not callable(loaded):
        raise UnknownArchitecture(f"entry point {arch_id!r} ({entries[0].value}) is not a class or function")
    return loaded


def build(spec: dict[str, Any]) -> nn.Module:
    """Build the module a manifest's ``architecture`` entry describes."""
    arch_id = spec.get("id")
    if not isinstance(arch_id, str):
        raise _unknown(arch_id)
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"architecture {arch_id!r}: params must be a mapping, not {type(params).__name__}")
    module = factory(arch_id)(**params)
    if not isinstance(module, nn.Module):
        raise ValueError(f"architecture {arch_id!r} built a {type(module).__name__}, not a torch.nn.Module")
    return module
