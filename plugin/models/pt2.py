"""torch.export programs (``.pt2``), read as data: checked before torch sees a byte.

``torch.export.load`` is not safe on a file from elsewhere. In torch 2.13 it unpickles
(``torch.load(weights_only=False)``, ``pickle.loads``) any weight or constant entry the
archive flags ``use_pickle``, and its custom and opaque objects; it falls back to
unpickling sample inputs that a safe load refuses; it loads AOTInductor entries, which are
compiled native code; it hands every symbolic size (``expr_str``) to ``sympy.sympify``,
which evaluates Python; ``ExportedProgram.module()`` executes the program's
``guards_code`` strings; and parameter names and argument names are pasted into the
Python source that torch.fx generates and executes. Each of those runs what the file
says. So a program is accepted only when its archive holds nothing but a graph in JSON,
raw tensor bytes and configs, and every string that could reach an evaluator is of a
shape that cannot carry code: names are dotted identifiers, symbolic sizes and guards are
arithmetic over sizes and sympy's own functions, pytree specs are plain tuples, lists and
dicts, and free text (stack traces, module paths) is printable, so that the comments it
ends up in stay comments. Nothing is fixed up: anything else is refused by name.

The same check runs at import and at every load, on the bytes that are then loaded.
"""

import io
import json
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from plugin.models.inputspec import DTYPES, InputSpec


class ProgramError(ValueError):
    """The file is not a program radpipe will load; ``str()`` says why in one line."""


# Archive entries, below its one root folder, of a program written by torch.export.save:
# raw tensor bytes, JSON and version stamps, and the sample inputs (tensors only, checked).
_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|extra/[\w.-]+"
)
_PAYLOADS = {
    "data/weights/model_weights_config.json": "weight_",
    "data/constants/model_constants_config.json": "tensor_",
}

_NAME = re.compile(r"[\w.]*", re.ASCII)  # names, module paths, operator names
# Functions a symbolic size or guard may call: sympy's (as srepr writes them) and torch's
# own sympy functions (the names torch's deserializer binds), Python's max, min and abs
# (guards). None has side effects.
_FUNCTIONS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "floor", "ceiling",
    "oo", "zoo", "nan", "true", "false", "S", "Infinity", "NegativeInfinity", "IntInfinity", "NegativeIntInfinity",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity", "True", "False", "and", "or", "not", "max", "min", "abs",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "commutative",
}  # fmt: skip
_SYMBOL = re.compile(r"[a-z]+\d+")  # s0, u3, ...: the sizes torch's shape environment names
_TOKEN = re.compile(
    r"\s*(?:(?P<size>L\['[A-Za-z_]\w*'\]\.size\(\)\[\d+\])|(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_]\w*)|'(?P<quoted>[A-Za-z_]\w*)'|(?P<op>//|\*\*|==|!=|<=|>=|[-+*/%()<>,=\[\]]))",
    re.ASCII,
)
_SINGLE_LINE_TEXT = {
    "nn_module_stack",
    "source_fn_stack",
    "torch_fn",
    "custom",
    "as_string",
    "as_strings",
    "torch_version",
}
_LEAF: dict[str, Any] = {"type": None, "context": None, "children_spec": []}


def _expression(text: str, guard: bool) -> bool:
    """Whether ``text`` is arithmetic over sizes and :data:`_FUNCTIONS` only: numbers,
    operators, parentheses, symbols (``s0``), quoted symbol names (``Symbol('s0')``), and
    for a guard the input's sizes (``L['x'].size()[2]``). No attribute access, no other
    name, no string that is not a symbol's name."""
    position = 0
    while position < len(text):
        token = _TOKEN.match(text, position)
        if token is None or token.end() == position:
            return text[position:].isspace()
        name, quoted = token["name"], token["quoted"]
        if name is not None and name not in _FUNCTIONS and not _SYMBOL.fullmatch(name):
            return False
        if quoted is not None and not _SYMBOL.fullmatch(quoted):
            return False
        if (token["size"] or token["op"] in ("[", "]")) and not guard:
            return False
        position = token.end()
    return True


def _treespec(node: Any) -> bool:
    """A pytree spec of plain tuples, lists and dicts (string keys): a spec may otherwise
    name a type or enum to import and call when it is read."""
    if not isinstance(node, dict) or node.keys() != _LEAF.keys():
        return False
    kind, context, children = node["type"], node["context"], node["children_spec"]
    if kind is None:
        return context is None and children == []
    if kind in ("builtins.tuple", "builtins.list"):
        valid_context = context == "null"
    elif kind == "builtins.dict":
        keys = json.loads(context) if isinstance(context, str) else None
        valid_context = isinstance(keys, list) and all(isinstance(k, str) and _NAME.fullmatch(k) for k in keys)
    else:
        return False
    return valid_context and isinstance(children, list) and all(_treespec(child) for child in children)


def _spec(text: Any) -> Any:
    """The root node of a serialized pytree spec (``[protocol, root]``), or None."""
    try:
        loaded = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    return loaded[1] if isinstance(loaded, list) and len(loaded) == 2 else None


def _strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every (key, string) in a JSON document, dict keys included (under the key ``"key"``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield ("range_constraints" if key == "range_constraints" else "key"), k
            yield from _strings(v, k)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, key)
    elif isinstance(value, str):
        yield key, value


def _check_string(key: str, text: str) -> str | None:
    """Why the string ``text`` under ``key`` of a program's JSON could carry code; None if it cannot."""
    if key in ("expr_str", "range_constraints"):
        return None if _expression(text, guard=False) else f"symbolic size {text[:80]!r}"
    if key == "guards_code":
        return None if _expression(text, guard=True) else f"guard {text[:80]!r}"
    if key in ("in_spec", "out_spec"):
        return None if _treespec(_spec(text)) else f"{key} {text[:80]!r} (only tuples, lists and dicts)"
    if key == "stack_trace":
        return None if all(line.isprintable() for line in text.split("\n")) else "a stack trace with control characters"
    if key in _SINGLE_LINE_TEXT:
        return None if text.isprintable() else f"{key} with control characters"
    return None if _NAME.fullmatch(text) else f"{key} {text[:80]!r} (not a name)"


def _signature(program: dict[str, Any]) -> None:
    """One tensor in, and a tensor (or a tuple/list of tensors, the first being the logits) out."""
    roots = [e for e in program["graph_module"]["module_call_graph"] if e.get("fqn") == ""]
    signature = roots[0].get("signature") if roots else None
    if not signature:
        raise ProgramError("it records no call signature")
    one_tensor = {
        "type": "builtins.tuple",
        "context": "null",
        "children_spec": [
            {"type": "builtins.tuple", "context": "null", "children_spec": [_LEAF]},
            {"type": "builtins.dict", "context": "[]", "children_spec": []},
        ],
    }
    if _spec(signature["in_spec"]) != one_tensor:
        raise ProgramError("it must take exactly one tensor (a batch of images) and no other argument")
    out = _spec(signature["out_spec"])
    if out != _LEAF and not (out and out["type"] != "builtins.dict" and out["children_spec"][:1] == [_LEAF]):
        raise ProgramError("it must return the logits as a tensor (or as the first of a tuple or list)")


def check_program(data: bytes) -> None:
    """Refuse (:class:`ProgramError`) a ``.pt2`` that holds anything loading could execute."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as e:
        raise ProgramError(f"not a torch.export archive: {e}") from e
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or not all("/" in name for name in names):
        raise ProgramError("not a torch.export archive (its entries must share one root folder)")
    entries = {name.split("/", 1)[1]: name for name in names}
    for entry in entries:
        if not _ENTRIES.fullmatch(entry):
            raise ProgramError(
                f"entry {entry!r} is not part of a plain torch.export program (compiled or pickled code)"
            )
    if "models/model.json" not in entries:
        raise ProgramError("it holds no program named 'model' (write it with torch.export.save)")
    for config_file, prefix in _PAYLOADS.items():
        if config_file not in entries:
            continue
        for fqn, meta in json.loads(archive.read(entries[config_file]))["config"].items():
            if meta.get("use_pickle") is not False or not re.fullmatch(rf"{prefix}\d+", str(meta.get("path_name"))):
                raise ProgramError(f"its entry for {fqn!r} is a pickle, which loading would execute")
            if not _NAME.fullmatch(fqn):
                raise ProgramError(f"tensor name {fqn[:80]!r} is not a name")
    program = json.loads(archive.read(entries["models/model.json"]))
    for key, text in _strings(program):
        problem = _check_string(key, text)
        if problem is not None:
            raise ProgramError(f"its graph holds {problem}, which loading could execute")
    _signature(program)
    if "data/sample_inputs/model.pt" in entries:
        try:
            torch.load(io.BytesIO(archive.read(entries["data/sample_inputs/model.pt"])), weights_only=True)
        except Exception as e:  # torch.export.load would retry this with weights_only=False
            raise ProgramError("its sample inputs are not plain tensors (a pickle that loading would execute)") from e


def load_program(data: bytes) -> ExportedProgram:
    """The checked program in ``data`` (the bytes of a ``.pt2``)."""
    check_program(data)
    return torch.export.load(io.BytesIO(data))


def program_module(program: ExportedProgram, device: torch.device) -> nn.Module:
    """The program as a module on ``device``. ``check_guards=False``: ``module()`` would
    otherwise compile the program's guard strings into code (radpipe checks the input's
    shape against the manifest instead)."""
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module(check_guards=False)


def input_spec(program: ExportedProgram) -> InputSpec:
    """The input a program was exported for: channels and sizes where they are fixed, None
    where the export made them dynamic (``torch.export.Dim``), and its dtype."""
    [name] = program.graph_signature.user_inputs
    value = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"]
    dtype = next((key for key, known in DTYPES.items() if known == getattr(value, "dtype", None)), None)
    if not isinstance(value, Tensor) or dtype is None or value.dim() not in (4, 5):
        raise ProgramError(f"its input must be a float batch of 2D or 3D images, not {value}")
    sizes = [int(size) if isinstance(size, int) else None for size in value.shape]
    if sizes[1] is None:
        raise ProgramError("its channel count is dynamic: export it with a fixed number of channels")
    return InputSpec(sizes[1], tuple(sizes[2:]), dtype, sizes[0])
