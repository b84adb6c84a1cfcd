"""Per-host download accounting for report.json's "downloads" section.

Every URL a shard tried to fetch is counted once, under its host: fetched (the server returned
image bytes; the image stages may still reject them) or failed with one download reason. Shards
store their own `DownloadStats` beside their Tally; the driver merges them in input order, so the
section is the same whatever the number of workers or engine. `--retry-failed` takes the retried
records' old failures out (`remove`) before counting their new outcome.
"""

from __future__ import annotations

from typing import Any

from data_tools.download import RETRYABLE

TOP_HOSTS = 20  # hosts listed in the report, most failures first
TOP_REASONS = 3  # failure reasons listed per host


class DownloadStats:
    """host -> [attempted, fetched, {reason: count}]."""

    def __init__(self) -> None:
        self.hosts: dict[str, list[Any]] = {}

    def add(self, host: str, reason: str | None) -> None:
        """One download attempt's final outcome; reason None means fetched."""
        counts = self.hosts.setdefault(host, [0, 0, {}])
        counts[0] += 1
        if reason is None:
            counts[1] += 1
        else:
            counts[2][reason] = counts[2].get(reason, 0) + 1

    def remove(self, host: str, reason: str) -> None:
        """Forget one failure (its record is about to be fetched again)."""
        counts = self.hosts[host]
        counts[0] -= 1
        counts[2][reason] -= 1
        if not counts[2][reason]:
            del counts[2][reason]
        if not counts[0]:
            del self.hosts[host]

    def merge(self, other: DownloadStats) -> None:
        for host, (attempted, fetched, failed) in other.hosts.items():
            counts = self.hosts.setdefault(host, [0, 0, {}])
            counts[0] += attempted
            counts[1] += fetched
            for reason, n in failed.items():
                counts[2][reason] = counts[2].get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"hosts": self.hosts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DownloadStats:
        stats = cls()
        stats.hosts = data["hosts"]
        return stats

    def to_report(self) -> dict[str, Any]:
        """Totals, the success rate (fetched / attempted) and the hosts with the most failures."""
        attempted = sum(c[0] for c in self.hosts.values())
        fetched = sum(c[1] for c in self.hosts.values())
        failed: dict[str, int] = {}
        for _, _, reasons in self.hosts.values():
            for reason, n in reasons.items():
                failed[reason] = failed.get(reason, 0) + n
        worst = sorted(self.hosts.items(), key=lambda item: (-(item[1][0] - item[1][1]), item[0]))
        return {
            "attempted": attempted,
            "fetched": fetched,
            "success_rate": round(fetched / attempted, 4) if attempted else None,
            "failed": dict(sorted(failed.items())),
            "retryable_failures": sum(n for reason, n in failed.items() if reason in RETRYABLE),
            "hosts": len(self.hosts),
            "top_failing_hosts": [
                {
                    "host": host,
                    "attempted": counts[0],
                    "fetched": counts[1],
                    "success_rate": round(counts[1] / counts[0], 4),
                    "top_failures": dict(sorted(counts[2].items(), key=lambda item: (-item[1], item[0]))[:TOP_REASONS]),
                }
                for host, counts in worst[:TOP_HOSTS]
                if counts[0] > counts[1]
            ],
        }


def summary_lines(section: dict[str, Any]) -> list[str]:
    """Human lines for stdout."""
    if not section["attempted"]:
        return ["downloads: none attempted"]
    lines = [f"downloads:    {section['fetched']} of {section['attempted']} fetched "
             f"({100 * section['success_rate']:.1f}%), {section['retryable_failures']} retryable with --retry-failed"]
    for host in section["top_failing_hosts"][:3]:
        failures = ", ".join(f"{reason}={n}" for reason, n in host["top_failures"].items())
        lines.append(f"  {host['host']}: {host['attempted'] - host['fetched']} failed of {host['attempted']} ({failures})")
    return lines
