"""``radpipe compare``: a shadow pipeline against the live one it shadows, from the journal.

The live pipeline's Present/Absent is the reference: sensitivity is the share of the
series it called Present that the shadow also called Present, specificity the share of
those it called Absent that the shadow also called Absent. Series are named by Study and
Series Instance UID only: no patient name or ID is ever shown.
"""

from dataclasses import dataclass

from plugin.journal import FindingPair
from plugin.replay import describe_since


@dataclass(frozen=True)
class Agreement:
    """One finding over every series both pipelines evaluated (counts against the live one)."""

    label: str
    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int
    mean_difference: float  # shadow's probability minus live's

    @property
    def series(self) -> int:
        return self.true_positive + self.false_negative + self.true_negative + self.false_positive

    @property
    def agree(self) -> int:
        return self.true_positive + self.true_negative

    @property
    def sensitivity(self) -> float | None:
        positives = self.true_positive + self.false_negative
        return self.true_positive / positives if positives else None

    @property
    def specificity(self) -> float | None:
        negatives = self.true_negative + self.false_positive
        return self.true_negative / negatives if negatives else None


def agreements(pairs: list[FindingPair]) -> list[Agreement]:
    """Per finding, in order of first appearance."""
    by_label: dict[str, list[FindingPair]] = {}
    for pair in pairs:
        by_label.setdefault(pair.label, []).append(pair)
    return [
        Agreement(
            label,
            sum(p.live_present and p.shadow_present for p in found),
            sum(p.live_present and not p.shadow_present for p in found),
            sum(not p.live_present and not p.shadow_present for p in found),
            sum(not p.live_present and p.shadow_present for p in found),
            sum(p.shadow_probability - p.live_probability for p in found) / len(found),
        )
        for label, found in by_label.items()
    ]


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _verdict(present: bool, probability: float) -> str:
    return f"{'present' if present else 'absent'} {probability:.3f}"


def report(live: str, shadow: str, pairs: list[FindingPair], since: float) -> list[str]:
    """The comparison as printed: a row per finding, then every disagreement by UID."""
    window = describe_since(since)
    lines = [f"{shadow} (shadow) against {live} (live, the reference), series both evaluated {window}:"]
    header = ("finding", "series", "agree", "disagree", "agreement", "sensitivity", "specificity", "mean_diff")
    lines.append("  ".join(f"{h:>11}" for h in header))
    for a in agreements(pairs):
        row = (
            a.label,
            a.series,
            a.agree,
            a.series - a.agree,
            _share(a.agree / a.series),
            _share(a.sensitivity),
            _share(a.specificity),
            f"{a.mean_difference:+.3f}",
        )
        lines.append("  ".join(f"{value:>11}" for value in row))
    disagreements = [p for p in pairs if not p.agree]
    lines.append(f"disagreements: {len(disagreements)}")
    lines += [
        f"  {p.label}  live {_verdict(p.live_present, p.live_probability)}"
        f"  shadow {_verdict(p.shadow_present, p.shadow_probability)}"
        f"  study {p.study_instance_uid}  series {p.series_instance_uid or '(whole study)'}"
        for p in disagreements
    ]
    return lines
