"""Accounting: every record read is counted once, as kept or under exactly one rejection reason.

A `Tally` is filled per shard by the workers (stored with the shard's intermediate result, so a
resumed run still counts reused shards), merged in input order, then completed by the global
stages (dedup, cap). `build_report` turns it into report.json.
"""

from __future__ import annotations

from typing import Any

from data_tools.records import Reason

MAX_EXAMPLES = 5  # per reason, in input order


class Tally:
    """Counts per reason, per input file and per query, plus the first few examples of each reason."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.queries: dict[str, dict[str, int]] = {}
        self.examples: dict[str, list[str]] = {}

    def add_file(self, file: str) -> None:
        """List an input file even if it holds no records, in input order."""
        self._file(file)

    def add_read(self, file: str, query: str | None) -> None:
        """Count a record as read; its query is None when the record could not be parsed."""
        self._file(file)["read"] += 1
        if query is not None:
            self._query(query)["read"] += 1

    def add_kept(self, file: str, query: str) -> None:
        self._file(file)["kept"] += 1
        self._query(query)["kept"] += 1

    def add_rejected(self, file: str, query: str | None, reason: Reason, example: str | None) -> None:
        """Count one rejection; `example` ("path:line: detail") is kept if it is among the first few."""
        rejected = self._file(file)["rejected"]
        rejected[reason.value] = rejected.get(reason.value, 0) + 1
        if query is not None:
            counts = self._query(query)
            counts["rejected"] += 1
            if reason is Reason.QUERY_CAP:
                counts["capped"] += 1
        if example is not None:
            self.add_example(reason, example)

    def remove_rejected(self, file: str, query: str | None, reason: Reason, example: str | None) -> None:
        """Undo add_read + add_rejected for one record that is processed again (build-pairs --retry-failed)."""
        counts = self._file(file)
        counts["read"] -= 1
        counts["rejected"][reason.value] -= 1
        if not counts["rejected"][reason.value]:
            del counts["rejected"][reason.value]
        if query is not None:
            per_query = self._query(query)
            per_query["read"] -= 1
            per_query["rejected"] -= 1
        if example is not None and example in self.examples.get(reason.value, []):
            self.examples[reason.value].remove(example)

    def add_counts(self, file: str, kept: int, rejected: dict[Reason, int]) -> None:
        """add_kept and add_rejected (without examples) for many of one file's records at once; queries
        are counted by add_query_counts."""
        counts = self._file(file)
        counts["kept"] += kept
        for reason, n in rejected.items():
            counts["rejected"][reason.value] = counts["rejected"].get(reason.value, 0) + n

    def add_query_counts(self, query: str, kept: int, rejected: int, capped: int) -> None:
        counts = self._query(query)
        counts["kept"] += kept
        counts["rejected"] += rejected
        counts["capped"] += capped

    def wants_example(self, reason: Reason) -> bool:
        """Whether a rejection for `reason` would still be kept as an example (a caller can skip building it)."""
        return len(self.examples.get(reason.value, ())) < MAX_EXAMPLES

    def add_example(self, reason: Reason, example: str) -> None:
        examples = self.examples.setdefault(reason.value, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(example)

    def merge(self, other: Tally) -> None:
        """Add another slice's counts; merging in input order keeps the examples the first ones."""
        for file, counts in other.files.items():
            mine = self._file(file)
            mine["read"] += counts["read"]
            mine["kept"] += counts["kept"]
            for reason, n in counts["rejected"].items():
                mine["rejected"][reason] = mine["rejected"].get(reason, 0) + n
        for query, counts in other.queries.items():
            mine_q = self._query(query)
            for key, n in counts.items():
                mine_q[key] += n
        for reason, examples in other.examples.items():
            mine_e = self.examples.setdefault(reason, [])
            mine_e.extend(examples[: MAX_EXAMPLES - len(mine_e)])

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "queries": self.queries, "examples": self.examples}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tally:
        tally = cls()
        tally.files, tally.queries, tally.examples = data["files"], data["queries"], data["examples"]
        return tally

    def _file(self, file: str) -> dict[str, Any]:
        return self.files.setdefault(file, {"read": 0, "kept": 0, "rejected": {}})

    def _query(self, query: str) -> dict[str, int]:
        return self.queries.setdefault(query, {"read": 0, "kept": 0, "rejected": 0, "capped": 0})


def build_report(
    tally: Tally,
    *,
    splits: dict[str, int],
    split_fractions: dict[str, float],
    outputs: list[str],
    input_errors: list[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The report.json document; totals are derived from the per-file counts so they always add up."""
    reasons: dict[str, int] = {}
    for counts in tally.files.values():
        for reason, n in counts["rejected"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    return {
        "warnings": split_warnings(splits, split_fractions),
        "records_read": sum(c["read"] for c in tally.files.values()),
        "kept": sum(c["kept"] for c in tally.files.values()),
        "rejected_total": sum(reasons.values()),
        "rejected": dict(sorted(reasons.items())),
        "splits": splits,
        "per_file": {
            file: {**counts, "rejected": dict(sorted(counts["rejected"].items()))} for file, counts in tally.files.items()
        },
        "per_query": dict(sorted(tally.queries.items())),
        "examples": dict(sorted(tally.examples.items())),
        "input_errors": input_errors,
        "settings": settings,
        "outputs": outputs,
    }


def split_warnings(counts: dict[str, int], fractions: dict[str, float]) -> list[str]:
    """One line per requested split (fraction > 0) that came out empty, saying how to fix it.

    Nothing else notices: the build succeeds, and fine-tuning refuses the empty split only later.
    """
    kept = sum(counts.values())
    warnings = []
    for name, n in counts.items():
        if n == 0 and fractions.get(name, 0) > 0:
            expected = kept * fractions[name]
            warnings.append(
                f"split '{name}' is empty: {100 * fractions[name]:g}% of the {kept} pairs kept is {expected:.1f} "
                f"pairs, and pairs go to a split in whole leak-free groups; add crawl data, or give '{name}' a "
                f"larger share with --splits TRAIN,VALID,TEST (e.g. --splits 0.8,0.1,0.1)")
    return warnings


def summary(report: dict[str, Any], top: int = 8) -> str:
    """A few human lines for stdout; report.json has everything."""
    read = report["records_read"]
    lines = [
        f"records read: {read}",
        f"kept:         {report['kept']} ({_percent(report['kept'], read)})  "
        + "  ".join(f"{name}={n}" for name, n in report["splits"].items()),
        f"rejected:     {report['rejected_total']} ({_percent(report['rejected_total'], read)})",
    ]
    by_count = sorted(report["rejected"].items(), key=lambda item: (-item[1], item[0]))
    lines += [f"  {reason:<22} {n}" for reason, n in by_count[:top]]
    if len(by_count) > top:
        lines.append(f"  ... {len(by_count) - top} more reasons in report.json")
    capped = [q for q, c in report["per_query"].items() if c["capped"]]
    if capped:
        lines.append(f"queries capped: {len(capped)} of {len(report['per_query'])}")
    lines += [f"input error: {error}" for error in report["input_errors"]]
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"
