"""The routing language of a pipeline's ``match:`` block.

A block is a mapping; every entry must hold. A key is a DICOM keyword (``Modality``),
a tag (``(0018,0050)``), a private tag with its creator (``(0019,GEMS_ACQU_01,0C)``:
group, private creator, element offset), or one of the combinators ``any`` (a list of
blocks, one must hold), ``all`` (a list of blocks, all must hold), ``not`` (a block
that must not hold). A value is a test on the attribute:

- a literal (``Modality: CT``): equal to the attribute, or to any of its values when it
  is multi-valued (``ImageType: AXIAL``); numbers compare as numbers;
- ``{in: [CT, MR]}``: equal to one of the listed values;
- ``{regex: "(?i)chest"}``: Python regular expression found in a value (``re.search``);
- ``{range: [lo, hi]}``: a numeric value within [lo, hi] (``null`` for an open end);
- ``{exists: true|false}``: the attribute is present with a value, or not;
- ``{not: <test>}``: the test does not hold.

Tests see a header-only dataset, so matching never reads pixel data. Parsing collects
every error with its path inside the block, so the pipeline loader can point at the line.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from plugin.logs import IDENTIFYING_KEYWORDS, REDACTED

Path = tuple[str | int, ...]

COMBINATORS = ("any", "all", "not")
_TAG = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")
_PRIVATE = re.compile(r"^\(([0-9A-Fa-f]{4}),([^,()]+),([0-9A-Fa-f]{2})\)$")


@dataclass(frozen=True)
class MatchError:
    path: Path
    message: str


class Attribute:
    """Where a condition looks: a keyword, a tag, or a private tag by creator."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._tag: BaseTag | None = None
        self._private: tuple[int, str, int] | None = None
        if m := _TAG.match(text):
            self._tag = Tag(int(m.group(1), 16), int(m.group(2), 16))
        elif m := _PRIVATE.match(text):
            group = int(m.group(1), 16)
            if group % 2 == 0:
                raise ValueError(f"{text}: a private group is odd, {m.group(1)} is not")
            self._private = (group, m.group(2).strip(), int(m.group(3), 16))
        elif (tag := tag_for_keyword(text)) is not None:
            self._tag = Tag(tag)
        else:
            raise ValueError(f"unknown DICOM keyword {text!r} (use a keyword, (gggg,eeee) or (gggg,CREATOR,ee))")
        self.identifying = self._tag is not None and keyword_for_tag(self._tag) in IDENTIFYING_KEYWORDS

    def values(self, ds: Dataset) -> list[str] | None:
        """The attribute's values as strings, or None when absent or empty."""
        if self._private is not None:
            group, creator, offset = self._private
            try:
                element = ds.private_block(group, creator)[offset]
            except KeyError:
                return None
        elif self._tag is not None and self._tag in ds:
            element = ds[self._tag]
        else:
            return None
        value = element.value
        if value is None or value == "" or (isinstance(value, (list, MultiValue)) and len(value) == 0):
            return None
        if isinstance(value, bytes):
            value = value.decode("latin-1").strip("\0 ")
        items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        return [str(v) for v in items]


class Test(Protocol):
    def passes(self, values: list[str] | None) -> bool: ...
    def describe(self, name: str) -> str: ...


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Equals:
    expected: tuple[str, ...]

    def passes(self, values: list[str] | None) -> bool:
        return values is not None and any(_same(v, e) for v in values for e in self.expected)

    def describe(self, name: str) -> str:
        if len(self.expected) == 1:
            return f"{name} == {self.expected[0]!r}"
        return f"{name} in {list(self.expected)!r}"


def _same(value: str, expected: str) -> bool:
    a, b = _number(value), _number(expected)
    return a == b if a is not None and b is not None else value.strip() == expected.strip()


@dataclass(frozen=True)
class Regex:
    pattern: re.Pattern[str]

    def passes(self, values: list[str] | None) -> bool:
        return values is not None and any(self.pattern.search(v) for v in values)

    def describe(self, name: str) -> str:
        return f"{name} matches /{self.pattern.pattern}/"


@dataclass(frozen=True)
class Range:
    low: float | None
    high: float | None

    def passes(self, values: list[str] | None) -> bool:
        numbers = [n for n in map(_number, values or []) if n is not None]
        return any((self.low is None or n >= self.low) and (self.high is None or n <= self.high) for n in numbers)

    def describe(self, name: str) -> str:
        return f"{name} in range [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Exists:
    expected: bool

    def passes(self, values: list[str] | None) -> bool:
        return (values is not None) == self.expected

    def describe(self, name: str) -> str:
        return f"{name} {'exists' if self.expected else 'is absent'}"


@dataclass(frozen=True)
class Negated:
    test: Test

    def passes(self, values: list[str] | None) -> bool:
        return not self.test.passes(values)

    def describe(self, name: str) -> str:
        return f"not ({self.test.describe(name)})"


class Rule(Protocol):
    def failure(self, ds: Dataset) -> str | None:
        """None when the rule holds, else what failed, with the file's actual values."""
        ...


@dataclass(frozen=True)
class Condition:
    attribute: Attribute
    test: Test

    def failure(self, ds: Dataset) -> str | None:
        values = self.attribute.values(ds)
        if self.test.passes(values):
            return None
        shown = REDACTED if self.attribute.identifying else "\\".join(values or [])  # never a patient's identity
        actual = "absent" if values is None else shown
        return f"{self.test.describe(self.attribute.text)} failed (actual: {actual})"


@dataclass(frozen=True)
class AllOf:
    rules: tuple[Rule, ...]

    def failure(self, ds: Dataset) -> str | None:
        return next((f for rule in self.rules if (f := rule.failure(ds)) is not None), None)


@dataclass(frozen=True)
class AnyOf:
    rules: tuple[Rule, ...]

    def failure(self, ds: Dataset) -> str | None:
        failures = [rule.failure(ds) for rule in self.rules]
        if any(f is None for f in failures):
            return None
        return "none of `any` held: " + "; ".join(f for f in failures if f)


@dataclass(frozen=True)
class NoneOf:
    rule: Rule

    def failure(self, ds: Dataset) -> str | None:
        return None if self.rule.failure(ds) is not None else "`not` block held"


def holds(rule: Rule, ds: Dataset) -> bool:
    return rule.failure(ds) is None


def parse_test(spec: Any, path: Path, errors: list[MatchError]) -> Test | None:
    """One attribute's test; appends to ``errors`` and returns None when invalid."""
    if isinstance(spec, (str, int, float)) and not isinstance(spec, bool):
        return Equals((str(spec),))
    if not (isinstance(spec, dict) and len(spec) == 1):
        errors.append(MatchError(path, "a test is a literal or one of {in, regex, range, exists, not}"))
        return None
    ((operator, operand),) = spec.items()
    where = (*path, operator)
    if operator == "in":
        if isinstance(operand, list) and operand and all(isinstance(v, (str, int, float)) for v in operand):
            return Equals(tuple(str(v) for v in operand))
        errors.append(MatchError(where, "'in' needs a non-empty list of values"))
    elif operator == "regex":
        try:
            return Regex(re.compile(str(operand)))
        except re.error as e:
            errors.append(MatchError(where, f"invalid regex {operand!r}: {e}"))
    elif operator == "range":
        ok = isinstance(operand, list) and len(operand) == 2
        ok = ok and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in operand)
        if ok and (operand[0] is None or operand[1] is None or operand[0] <= operand[1]):
            return Range(operand[0], operand[1])
        errors.append(MatchError(where, "'range' needs [low, high] numbers with low <= high (null: open end)"))
    elif operator == "exists":
        if isinstance(operand, bool):
            return Exists(operand)
        errors.append(MatchError(where, "'exists' needs true or false"))
    elif operator == "not":
        inner = parse_test(operand, where, errors)
        return Negated(inner) if inner is not None else None
    else:
        errors.append(MatchError(where, f"unknown test {operator!r} (use in, regex, range, exists, not)"))
    return None


def parse_rules(spec: Any, path: Path, errors: list[MatchError]) -> Rule:
    """A whole ``match`` block (or a nested one under any/all/not)."""
    if not isinstance(spec, dict) or not spec:
        errors.append(MatchError(path, "a match block is a non-empty mapping of attribute: test"))
        return AllOf(())
    rules: list[Rule] = []
    for key, value in spec.items():
        where = (*path, key)
        if key in ("any", "all"):
            if not isinstance(value, list) or not value:
                errors.append(MatchError(where, f"'{key}' needs a non-empty list of match blocks"))
                continue
            parts = tuple(parse_rules(item, (*where, i), errors) for i, item in enumerate(value))
            rules.append(AnyOf(parts) if key == "any" else AllOf(parts))
        elif key == "not":
            rules.append(NoneOf(parse_rules(value, where, errors)))
        else:
            try:
                attribute = Attribute(str(key))
            except ValueError as e:
                errors.append(MatchError(where, str(e)))
                continue
            test = parse_test(value, where, errors)
            if test is not None:
                rules.append(Condition(attribute, test))
    return AllOf(tuple(rules))


def parse_match(spec: Any, path: Path = ("match",)) -> tuple[Rule, Sequence[MatchError]]:
    errors: list[MatchError] = []
    rule = parse_rules(spec, path, errors)
    return rule, errors
