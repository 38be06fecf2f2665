"""Rank 0's tables: one row per rank, then the all-reduce latency and bus bandwidth per message size."""

from __future__ import annotations

from trainer.tools.preflight.checks import RankReport, format_size


def _cell(report: RankReport, prefix: str) -> str:
    checks = [c for name, c in report.checks.items() if name.startswith(prefix)]
    if not checks:
        return "-"
    return "ok" if all(c.ok for c in checks) else "FAIL"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render(reports: list[RankReport], sizes: list[int], backend: str) -> list[str]:
    hosts = len({r.host for r in reports})
    lines = [f"preflight: {len(reports)} rank(s) on {hosts} host(s), backend {backend}", ""]
    header = "host rank local device memory".split() + ["device ok", "data read", "run folder", "all-reduce"]
    rows = [
        [r.host, str(r.rank), str(r.local_rank), r.device, r.memory]
        + [_cell(r, prefix) for prefix in ("device", "data ", "run folder", "all-reduce")]
        for r in reports
    ]
    lines += _table(header, rows)
    n = len(reports)
    timed = [s for s in sizes if all(s in r.timings for r in reports)]
    if timed:
        lines += [
            "",
            f"all-reduce over {n} rank(s), float32, slowest rank's mean time (busbw = algbw * 2(n-1)/n):",
        ]
        perf = []
        for s in timed:
            t = max(r.timings[s] for r in reports)
            algbw = s / t / 1e9 if t > 0 else float("inf")
            busbw = algbw * 2 * (n - 1) / n
            perf.append([format_size(s), f"{t * 1e6:.1f} us", f"{algbw:.3g} GB/s", f"{busbw:.3g} GB/s"])
        lines += _table(["size", "latency", "algbw", "busbw"], perf)
    failures = [(r, name, detail) for r in reports for name, detail in r.failures()]
    if failures:
        lines += ["", "failures:"]
        lines += [f"  host {r.host} rank {r.rank}: {name}: {detail}" for r, name, detail in failures]
    else:
        lines += ["", "preflight: every check passed"]
    return lines
