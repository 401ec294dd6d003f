"""YAML read safely, with the line and column of every key, so that errors found later
(by pydantic or by our own checks) can point at ``file:line:column``."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

Location = tuple[str | int, ...]


@dataclass
class YAMLFile:
    path: Path
    data: Any
    positions: dict[Location, tuple[int, int]] = field(default_factory=dict)

    def where(self, location: Location) -> str:
        """``file:line:column`` of the deepest known part of ``location``."""
        for end in range(len(location), -1, -1):
            if (found := self.positions.get(tuple(location[:end]))) is not None:
                return f"{self.path}:{found[0]}:{found[1]}"
        return f"{self.path}:1:1"


class YAMLError(Exception):
    """The file is not valid (safe) YAML; ``str()`` is ``file:line:column: message``."""


def _walk(
    node: yaml.Node, location: Location, positions: dict[Location, tuple[int, int]], errors: list[str], path: Path
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value
            here = (*location, name)
            mark = key.start_mark
            if name in seen:
                errors.append(f"{path}:{mark.line + 1}:{mark.column + 1}: duplicate key {name!r}")
            seen.add(name)
            positions[here] = (mark.line + 1, mark.column + 1)
            _walk(value, here, positions, errors, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            here = (*location, index)
            positions[here] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, here, positions, errors, path)


def read_yaml(path: Path, text: str | None = None) -> YAMLFile:
    """Parse with ``yaml.SafeLoader`` only: tags such as ``!!python/object`` are refused."""
    if text is None:
        text = path.read_text()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise YAMLError(f"{path}:{line}:{column}: {problem}") from e
    except yaml.YAMLError as e:
        raise YAMLError(f"{path}:1:1: {e}") from e
    finally:
        loader.dispose()
    result = YAMLFile(path, data, {(): (1, 1)})
    errors: list[str] = []
    if node is not None:
        _walk(node, (), result.positions, errors, path)
    if errors:
        raise YAMLError("\n".join(errors))
    return result


def validation_errors(error: ValidationError, where: Callable[[Location], str]) -> list[str]:
    """One ``where(location): location: message`` line per pydantic error; ``where`` is
    usually :meth:`YAMLFile.where`, so that each line points at its key."""
    lines = []
    for item in error.errors():
        location = tuple(p for p in item["loc"] if not str(p).startswith("function-"))
        dotted = ".".join(str(p) for p in location) or "(top level)"
        lines.append(f"{where(location)}: {dotted}: {item['msg'].removeprefix('Value error, ')}")
    return lines
