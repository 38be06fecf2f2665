"""The GPU check's summary and its archive: scripts/gpu_check.sh calls both at its end.

    python scripts/gpu_check_summary.py RESULTS_DIR --first-size 384          # the summary, to stdout
    python scripts/gpu_check_summary.py RESULTS_DIR --archive FILE --archive-mib 60

The summary gives the machine, the stages' status, every bench cell, each throughput goal with its verdict (the
figures, the ratio and the threshold, so that a missed goal says by how much), the smoke's verdict, the loaders'
tables and the tests' last line. The archive holds the whole results folder in one .tar.gz of at most --archive-mib
MiB, so that it comes back from a GPU machine in one piece: where everything would not fit, the largest files are
left out, largest first (never the summary, the status table, the machine file or a JSON report), and
archive_omitted.txt inside it lists them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

HF_VILT = "transformers-vilt"  # the bench's row name for transformers' ViltForQuestionAnswering
# samples/s from JPEG shards at 384 / 224 px, end to end, that the project sets itself on each GPU
THROUGHPUT_GOALS = {"H100": {384: 1900, 224: 3700}, "H200": {384: 2000, 224: 3900}}
HF_RATIO_GOAL = 2.0  # end to end at the first size, against transformers' ViLT in the same run
ENGINE_GAP_GOAL = 0.05  # the engine (synthetic cell) at most this much slower than plain PyTorch
DATA_WAIT_GOAL = 0.02  # of the shards cell's step time
KEEP = {"summary.txt", "stages.tsv", "machine.txt"}  # never left out of the archive, nor any .json


def bench_rows(out: Path) -> list[tuple[str, dict]]:
    """(file name, row) for every cell of every bench report in the folder, in file order."""
    files = sorted(out.glob("bench_*px*.json")) + sorted(out.glob("hf_vilt_*px.json"))
    files += sorted((out / "zero").glob("bench_*.json"))
    rows = []
    for f in files:
        for r in json.loads(f.read_text())["results"]:
            rows.append((f.name, r))
    return rows


def gpu_name(out: Path) -> str:
    """H100 or H200 where the reports' machine line names one of them, else ''."""
    text = " ".join(json.loads(f.read_text()).get("machine", "") for f in out.glob("*.json"))
    text += (out / "machine.txt").read_text() if (out / "machine.txt").is_file() else ""
    return next((g for g in THROUGHPUT_GOALS if g in text), "")


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _loader_host_share(shards: dict, synthetic: dict | None) -> float | None:
    """The part of a shards step in which the GPU idles beyond what it idles with batches already on it (the
    synthetic cell): host work the loader adds to the step, which data wait alone does not show."""
    a, b = shards.get("profile"), (synthetic or {}).get("profile")
    if not a or not b or not a["device_busy_s_per_step"] or not b["device_busy_s_per_step"]:
        return None
    idle = lambda p: p["wall_s_per_step"] - p["device_busy_s_per_step"]  # noqa: E731
    return max(0.0, idle(a) - idle(b)) / a["wall_s_per_step"]


def goal_lines(rows: list[tuple[str, dict]], gpu: str, first: int) -> list[str]:
    """One line per goal that the cells measured: the figures, the threshold, met or MISSED."""
    cells: dict[tuple[str, int, str], dict] = {}
    for name, r in rows:
        key = ("host_workers" if "host_workers" in name else r["mode"], r["image_size"], r["variant"])
        if not name.startswith("bench_stage"):  # ZeRO on one GPU is not the default engine
            cells.setdefault(key, r)
    lines = []
    sizes = sorted({size for _, size, v in cells if v != HF_VILT}, key=lambda s: s != first)
    hf = next((r for (_, size, v), r in cells.items() if v == HF_VILT and size == first), None)
    for size in sizes:
        ours = {mode: r for (mode, s, v), r in cells.items() if s == size and v != HF_VILT}
        for mode in ("shards", "host_workers"):
            r = ours.get(mode)
            if r is None:
                continue
            label = "end to end" + (" with data.host_workers=2" if mode == "host_workers" else "")
            rate = r["samples_per_s"]
            if size == first and hf is not None:
                ratio = rate / hf["samples_per_s"]
                lines.append(
                    f"{size} px {label}: {rate:.1f} samples/s against transformers' ViLT {hf['samples_per_s']:.1f}: "
                    f"{ratio:.2f}x (goal >= {HF_RATIO_GOAL:g}x): {_verdict(ratio >= HF_RATIO_GOAL)}"
                )
            goal = THROUGHPUT_GOALS.get(gpu, {}).get(size)
            if goal is not None:
                lines.append(
                    f"{size} px {label}: {rate:.1f} samples/s (goal on an {gpu} >= {goal}): {_verdict(rate >= goal)}"
                )
            wait = r["data_wait_fraction"]
            lines.append(
                f"{size} px {label}: data wait {wait * 100:.1f}% of the step (goal < {DATA_WAIT_GOAL * 100:g}%): "
                f"{_verdict(wait < DATA_WAIT_GOAL)}"
            )
            loader_host = _loader_host_share(r, ours.get("synthetic"))
            if loader_host is not None:
                lines.append(
                    f"{size} px {label}: the loader's host work in the step (profiled GPU idle time beyond the "
                    f"engine's own) {loader_host * 100:.1f}% of the step (goal < {DATA_WAIT_GOAL * 100:g}%): "
                    f"{_verdict(loader_host < DATA_WAIT_GOAL)}"
                )
        if "synthetic" in ours and "plain" in ours:
            engine, plain = ours["synthetic"]["samples_per_s"], ours["plain"]["samples_per_s"]
            gap = 1 - engine / plain
            lines.append(
                f"{size} px engine (batches on the GPU) {engine:.1f} against plain PyTorch {plain:.1f} samples/s: "
                f"{abs(gap) * 100:.1f}% {'slower' if gap >= 0 else 'faster'} (goal: at most "
                f"{ENGINE_GAP_GOAL * 100:g}% slower): {_verdict(gap <= ENGINE_GAP_GOAL)}"
            )
    return lines


def summary(out: Path, first: int) -> str:
    parts = []
    for name in ("machine.txt", "stages.tsv"):
        if (out / name).is_file():
            parts.append((out / name).read_text())
    rows = bench_rows(out)
    if rows:
        table = [
            f"{'file':34} {'variant':18} {'px':>4} {'mode':9} {'engine':32} {'samples/s':>9} {'MFU':>6} "
            f"{'wait':>6} {'1st s':>6}"
        ]
        for name, r in rows:
            table.append(
                f"{name:34} {r['variant']:18} {r['image_size']:>4} {r['mode']:9} {r['engine'][:32]:32} "
                f"{r['samples_per_s']:9.1f} {r['mfu'] * 100:5.1f}% {r['data_wait_fraction'] * 100:5.1f}% "
                f"{r['first_step_s']:6.1f}"
            )
        restarts = [f"{name} {r['mode']}" for name, r in rows if r.get("epoch_restarts")]
        if restarts:
            table.append("loader epochs restarted inside the timing: " + ", ".join(restarts))
        parts.append("\n".join(table))
        gpu = gpu_name(out)
        goals = goal_lines(rows, gpu, first)
        if goals:
            parts.append("goals" + (f" ({gpu})" if gpu else "") + ":\n" + "\n".join("  " + g for g in goals))
    smoke = out / "smoke" / "smoke.json"
    if smoke.is_file():
        v = json.loads(smoke.read_text())
        keys = (
            "loss_falls",
            "resumed_continues_curve",
            "resumed_starts_after_checkpoint",
            "dali_gpu",
            "dali_state_restored",
        )
        parts.append(
            "smoke: "
            + ", ".join(f"{k} {v.get(k)}" for k in keys)
            + f"\n  first run: {v['first_run_losses']}\n  resumed:   {v['resumed_run_losses']}"
        )
    for log in sorted(out.glob("loaders*.log")):
        table = [line for line in log.read_text().splitlines() if line.startswith(("|", "machine:", "data:"))]
        if table:
            parts.append(f"{log.stem}:\n" + "\n".join(table))
    tests = out / "tests.log"
    if tests.is_file() and tests.read_text().strip():
        parts.append("tests: " + tests.read_text().strip().splitlines()[-1])
    ranks = out / "ranks" / "bench_ranks.json"
    if ranks.is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from trainer.tools.bench.ranks_report import format_table

        parts.append(format_table(json.loads(ranks.read_text())))
    return "\n\n".join(parts) + "\n"


def _write(out: Path, archive: Path, left_out: list[Path]) -> int:
    skipped = set(left_out)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(p for p in out.rglob("*") if p.is_file() and p not in skipped):
            tar.add(path, arcname=f"{out.name}/{path.relative_to(out).as_posix()}")
        if left_out:
            listing = "".join(f"{p.stat().st_size}\t{p.relative_to(out).as_posix()}\n" for p in left_out)
            info = tarfile.TarInfo(f"{out.name}/archive_omitted.txt")
            info.size = len(listing.encode())
            tar.addfile(info, io.BytesIO(listing.encode()))
    return archive.stat().st_size


def write_archive(out: Path, archive: Path, limit_mib: int) -> list[Path]:
    """The folder as one .tar.gz of at most limit_mib MiB; the files left out to fit, largest first."""
    limit = limit_mib * 2**20
    optional = sorted(
        (p for p in out.rglob("*") if p.is_file() and p.name not in KEEP and p.suffix != ".json"),
        key=lambda p: p.stat().st_size,
        reverse=True,
    )
    left_out: list[Path] = []
    archive.parent.mkdir(parents=True, exist_ok=True)
    while _write(out, archive, left_out) > limit:
        if not optional:
            raise SystemExit(f"error: {archive}: over {limit_mib} MiB even with every optional file left out")
        left_out.append(optional.pop(0))
    return left_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python scripts/gpu_check_summary.py",
        description="The GPU check's summary (to stdout) or, with --archive, its results folder as one .tar.gz.",
    )
    p.add_argument("out", type=Path, help="the results folder of scripts/gpu_check.sh")
    p.add_argument(
        "--first-size", type=int, default=384, help="the image size of the transformers' ViLT cell"
    )
    p.add_argument("--archive", type=Path, help="write the folder as this .tar.gz instead of the summary")
    p.add_argument("--archive-mib", type=int, default=60, help="the archive's size limit in MiB")
    args = p.parse_args(argv)
    if not args.out.is_dir():
        p.error(f"{args.out}: not a folder")
    if args.archive is None:
        sys.stdout.write(summary(args.out, args.first_size))
        return 0
    left_out = write_archive(args.out, args.archive, args.archive_mib)
    size = args.archive.stat().st_size / 2**20
    print(
        f"archive: {args.archive} ({size:.1f} MiB)"
        + (f", {len(left_out)} files left out" if left_out else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
