"""The data report: every file a source did not turn into an index row, and why.

Bad input never disappears silently. Each problem found while materialising a
source is an `Issue` of a known *kind*; the policy (`data.policy`, the schema's
`DataPolicyParams`) decides per group of kinds whether the stage fails (a
`DataError` naming the files and what to do) or skips the files and lists them
in `data_report.json`.

Kinds and the policy key that governs them:

========================  ==============  ===========================================
kind                      policy key      meaning
========================  ==============  ===========================================
empty                     bad_files       zero-byte file
unreadable                bad_files       cannot be read (permissions, broken link, loop)
not_image                 bad_files       image extension, but not image content
corrupt                   bad_files       truncated or damaged image data
too_large                 bad_files       decompression bomb / absurd dimensions
unsafe_link               bad_files       a symlink out of the source, or to a folder containing it
label_conflict            label_issues    byte-identical image (or one CSV id) under different labels
missing_file              label_issues    a CSV label whose image file does not exist
unlabelled_file           label_issues    an image with no label (no CSV row / no class folder)
missing_label             label_issues    a CSV row with an empty id or label
empty_class               label_issues    a class folder without a usable image
duplicate                 duplicates      byte-identical copy (or CSV id listed again), same label (one kept)
leakage                   duplicates      byte-identical copy, same label, across official splits
non_image                 (always)        not an image by extension: ignored and counted
========================  ==============  ===========================================

The defaults fail on anything that changes labels and skip unreadable files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from transfer.pipeline.errors import UserError
from transfer.pipeline.params import DataParams
from transfer.pipeline.params import DataPolicyParams as Policy  # data.policy: its keys and defaults live in the schema

Action = Literal["skip", "fail"]

POLICY_OF_KIND: dict[str, str | None] = {
    "empty": "bad_files",
    "unreadable": "bad_files",
    "not_image": "bad_files",
    "corrupt": "bad_files",
    "too_large": "bad_files",
    "unsafe_link": "bad_files",
    "label_conflict": "label_issues",
    "missing_file": "label_issues",
    "unlabelled_file": "label_issues",
    "missing_label": "label_issues",
    "empty_class": "label_issues",
    "duplicate": "duplicates",
    "leakage": "duplicates",
    "non_image": None,
}

# What the user can do about each kind; appended to the DataError message.
ADVICE: dict[str, str] = {
    "bad_files": "fix or delete these files",
    "label_issues": "fix the labels (class folders / labels CSV) or remove the files",
    "duplicates": "delete the extra copies",
}

# Issues listed per kind in the JSON report; the count is always exact.
MAX_LISTED_PER_KIND = 1000

# Largest class over smallest above this, the report warns: data.imbalance_warning's default in the schema.
IMBALANCE_WARNING: float = DataParams.model_fields["imbalance_warning"].default


def class_balance(class_counts: Mapping[str, int], warn_above: float = IMBALANCE_WARNING) -> dict[str, Any]:
    """Images per class, the imbalance ratio (largest class / smallest) and whether it deserves a warning."""
    counts = {str(name): int(count) for name, count in sorted(class_counts.items())}
    if not counts:
        return {"class_counts": {}, "imbalance_ratio": None, "imbalance_warning": False}
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = counts[largest] / max(counts[smallest], 1)
    return {
        "class_counts": counts,
        "largest_class": largest,
        "smallest_class": smallest,
        "imbalance_ratio": round(ratio, 4),
        "imbalance_warning": ratio > warn_above,
    }


def imbalance_message(balance: Mapping[str, Any], warn_above: float = IMBALANCE_WARNING) -> str | None:
    """The warning printed for an imbalanced data set, with what to do about it; None when balanced."""
    if not balance.get("imbalance_warning"):
        return None
    counts = balance["class_counts"]
    return (
        f"warning: classes are imbalanced, {balance['imbalance_ratio']:.1f}:1 (largest "
        f"{balance['largest_class']} {counts[balance['largest_class']]} images, smallest "
        f"{balance['smallest_class']} {counts[balance['smallest_class']]}; above data.imbalance_warning "
        f"{warn_above:g}). Accuracy hides small classes: set head.class_balance / finetune.class_balance: loss "
        "and monitor: val_macro_f1, and read the per-class recall in the evaluate report"
    )


def action_for(policy: Policy, kind: str) -> Action:
    """What the policy does with an issue of this kind: "skip" or "fail" (kinds no key governs: skip)."""
    key = POLICY_OF_KIND[kind]
    return "skip" if key is None else getattr(policy, key)


@dataclass(frozen=True)
class Issue:
    kind: str
    path: str
    message: str
    label: str | None = None


class DataError(UserError, ValueError):
    """The source has problems the policy says to fail on."""


@dataclass
class DataReport:
    """Issues collected while materialising one source."""

    source: str
    issues: list[Issue] = field(default_factory=list)

    def add(self, kind: str, path: str, message: str, label: str | None = None) -> None:
        if kind not in POLICY_OF_KIND:
            raise KeyError(f"unknown data issue kind {kind!r}")
        self.issues.append(Issue(kind, path, message, label))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(issue.kind for issue in self.issues).items()))

    def failures(self, policy: Policy) -> list[Issue]:
        return [issue for issue in self.issues if action_for(policy, issue.kind) == "fail"]

    def raise_for_policy(self, policy: Policy, report_path: str) -> None:
        """Raise a DataError listing every issue whose kind the policy fails on."""
        failing = self.failures(policy)
        if not failing:
            return
        lines = []
        for key in ("label_issues", "bad_files", "duplicates"):
            group = [issue for issue in failing if POLICY_OF_KIND[issue.kind] == key]
            if not group:
                continue
            lines.append(
                f"{len(group)} {key.replace('_', ' ')} ({ADVICE[key]}, or set data.policy.{key}: skip "
                "to skip them with a report):"
            )
            lines += [f"  [{issue.kind}] {issue.message}" for issue in group[:20]]
            if len(group) > 20:
                lines.append(f"  ... and {len(group) - 20} more, all listed in {report_path}")
        raise DataError(f"source {self.source!r} has problems; details in {report_path}\n" + "\n".join(lines))

    def to_dict(self, policy: Policy, index_summary: Mapping[str, Any]) -> dict[str, Any]:
        listed: list[dict[str, Any]] = []
        per_kind: Counter[str] = Counter()
        for issue in self.issues:
            per_kind[issue.kind] += 1
            if per_kind[issue.kind] <= MAX_LISTED_PER_KIND:
                listed.append(
                    {
                        **asdict(issue),
                        "action": "ignored" if POLICY_OF_KIND[issue.kind] is None else action_for(policy, issue.kind),
                    }
                )
        return {
            "source": self.source,
            "policy": policy.model_dump(),
            **index_summary,
            "issue_counts": self.counts(),
            "issues": listed,
        }

    def summary_line(self) -> str:
        counts = self.counts()
        if not counts:
            return "no files skipped"
        return "skipped/ignored: " + ", ".join(f"{kind}={n}" for kind, n in counts.items())
