"""The routing language of a pipeline's ``match:`` block.

Each key is a DICOM keyword; each value is a condition on that attribute:

- a literal (``Modality: CT``): equal to the attribute, or to any of its values when
  the attribute is multi-valued (``ImageType: AXIAL``);
- ``{in: [CT, MR]}``: equal to one of the listed values;
- ``{regex: "(?i)chest"}``: Python regular expression found in the value (``re.search``).

All keys must hold. Conditions evaluate against a header-only dataset, so matching never
reads pixel data.
"""

import re
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue

Scalar = str | int | float


def _values(ds: Dataset, keyword: str) -> list[str] | None:
    """The attribute's values as strings, or None when it is absent or empty."""
    if keyword not in ds:
        return None
    value = ds.data_element(keyword).value
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v) for v in items]


@dataclass(frozen=True)
class Condition:
    """One ``keyword: condition`` pair, already validated."""

    keyword: str
    equals: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None

    def holds(self, ds: Dataset) -> bool:
        values = _values(ds, self.keyword)
        if values is None:
            return False
        if self.regex is not None:
            return any(self.regex.search(v) for v in values)
        return any(_same(v, e) for v in values for e in self.equals)

    def describe(self) -> str:
        if self.regex is not None:
            return f"{self.keyword} matches /{self.regex.pattern}/"
        if len(self.equals) == 1:
            return f"{self.keyword} == {self.equals[0]!r}"
        return f"{self.keyword} in {list(self.equals)!r}"

    def actual(self, ds: Dataset) -> str:
        values = _values(ds, self.keyword)
        return "absent" if values is None else "\\".join(values)


def _same(value: str, expected: str) -> bool:
    """Compare as numbers when both parse as numbers (IS/DS), else as stripped strings."""
    try:
        return float(value) == float(expected)
    except ValueError:
        return value.strip() == expected.strip()


def parse_condition(keyword: str, spec: Any) -> Condition:
    """Turn one YAML ``keyword: spec`` pair into a :class:`Condition`; raise ValueError."""
    if tag_for_keyword(keyword) is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    if isinstance(spec, (str, int, float)) and not isinstance(spec, bool):
        return Condition(keyword, equals=(str(spec),))
    if isinstance(spec, dict) and len(spec) == 1:
        ((operator, operand),) = spec.items()
        if operator == "in":
            if not isinstance(operand, list) or not operand:
                raise ValueError(f"{keyword}: 'in' needs a non-empty list")
            return Condition(keyword, equals=tuple(str(v) for v in operand))
        if operator == "regex":
            try:
                return Condition(keyword, regex=re.compile(str(operand)))
            except re.error as e:
                raise ValueError(f"{keyword}: invalid regex {operand!r}: {e}") from e
        raise ValueError(f"{keyword}: unknown operator {operator!r} (use a literal, 'in' or 'regex')")
    raise ValueError(f"{keyword}: a condition is a literal, {{in: [...]}} or {{regex: ...}}")


def first_failure(conditions: list[Condition], ds: Dataset) -> Condition | None:
    """The first condition that does not hold, or None when all hold."""
    return next((c for c in conditions if not c.holds(ds)), None)
