"""Find the metric names a PromQL expression reads, and the names a ``/metrics`` page exports.

No PromQL parser ships for Python; this tokenizer is enough for dashboards and rules:
it drops strings, label matchers, range selectors, label lists of ``by``/``on``/...,
Grafana variables, numbers and durations, then keeps identifiers that are not a function
call or a keyword.
"""

import re

from prometheus_client.parser import text_string_to_metric_families

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_LABEL_VALUES = re.compile(r"\blabel_values\(\s*([^,)]*?)\s*(?:,\s*\w+\s*)?\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")

# Suffixes the text format adds to a family's name, per type.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def metric_names(expr: str) -> set[str]:
    """Metric names read by ``expr`` (a PromQL expression or a Grafana ``label_values(...)``)."""
    text = _LABEL_VALUES.sub(r" \1 ", expr)
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', " ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        token = match.group()
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # 1e9, 5m, 0.5
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function
            continue
        if token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def exported_names(exposition: str) -> set[str]:
    """Every sample name a ``/metrics`` page can produce, declared series without samples included."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
