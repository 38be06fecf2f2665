"""`python -m data_pipeline.tools.convert_bench`: the VQA v2 converter at scale, with and without `--image-size`.

It writes a COCO-like set in the official VQA v2 format (`data_pipeline.convert.synthetic`: photo-like 640x480 JPEGs of
~155 KiB, like COCO's ~160 KB, and ~5.4 questions per image, VQA v2's ratio), then runs the real command line,
`python -m data_pipeline.convert vqa2 ...`, as a child process once per setting (images as they are, then each
`--image-size`). A child process keeps the measurement honest: its wall time includes start-up and JSON parsing,
and its peak memory is the converter's own, sampled from the process tree (the converter and its spawned
workers) every 0.1 s. Per setting: wall time, images/s, questions/s, shard bytes, bytes per question, peak memory,
and the PIL decode time of stored images (what a loader pays per sample); then the full VQA v2 train2014 + val2014
conversion projected from it. One table on stdout; `--json PATH` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from common.machine import machine
from data_pipeline.convert import build, synthetic
from data_pipeline.shards import sharding

# Official VQA v2 counts (questions, images) of the splits a training run converts.
FULL_VQA2 = {"train2014": (443_757, 82_783), "val2014": (214_354, 40_504)}
PROJECTED_CORES = 16
POLL_S = 0.1
GENERATED_IMAGE_KIB = 160  # for the free-space check only; the measured sizes are reported


def generate(root: Path, n_images: int, per_image: float, progress: bool) -> synthetic.Vqa2Files:
    """The COCO-like raw set under `root`; reused when `root` already holds one made with the same parameters."""
    params = {"n_images": n_images, "questions_per_image": per_image, "photo_like": True, "size": [640, 480]}
    stamp = root / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        print(f"reusing the generated set in {root}", file=sys.stderr)
        return synthetic.Vqa2Files(
            root, root / "questions.json", root / "annotations.json", root / "images", "train2014"
        )
    shutil.rmtree(root, ignore_errors=True)
    step = max(1, n_images // 20)

    def report(n: int) -> None:
        if progress and (n % step == 0 or n == n_images):
            print(f"  generated {n}/{n_images} images", file=sys.stderr)

    files = synthetic.write_vqa2(
        root,
        n_images=n_images,
        questions_per_image=per_image,
        bad=False,
        sizes=(640, 640, 480, 480),
        photo_like=True,
        on_image=report,
    )
    stamp.write_text(json.dumps(params))
    return files


def convert_argv(raw: synthetic.Vqa2Files, out: Path, workers: int, size: int | None) -> list[str]:
    """The converter's arguments (after `python -m data_pipeline.convert`). Every generated answer is frequent,
    so `--min-answer-count 1` only keeps the vocabulary independent of the set's size."""
    argv = ["vqa2", "--questions", str(raw.questions), "--annotations", str(raw.annotations)]
    argv += ["--images", str(raw.images), "--out", str(out), "--min-answer-count", "1"]
    argv += ["--workers", str(workers), "--overwrite"]
    return argv + (["--image-size", str(size)] if size is not None else [])


def _hwm(pid: int, rss: int) -> int:
    """The process's own peak resident set (VmHWM, Linux) in bytes; its current RSS where that is unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return rss


def _watch(pid: int, done: threading.Event, peaks: dict[str, int]) -> None:
    """Sample the process tree rooted at `pid` until `done`: the largest summed RSS, the largest single peak."""
    # psutil is optional here (run_measured falls back to getrusage without it), so it is imported where it is used.
    import psutil

    root = psutil.Process(pid)
    while not done.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            total += rss
            peaks["process"] = max(peaks["process"], _hwm(p.pid, rss))
        peaks["tree"] = max(peaks["tree"], total)
        done.wait(POLL_S)


def run_measured(argv: list[str], progress: bool) -> dict[str, Any]:
    """Run the converter as a child process: wall time and peak memory (see `memory_measure` in the result)."""
    cmd = [sys.executable, "-m", "data_pipeline.convert", *argv] + ([] if progress else ["--no-progress"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}
    peaks = {"tree": 0, "process": 0}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        import psutil  # noqa: F401  (a DeepSpeed dependency; optional here)

        watcher = threading.Thread(target=_watch, args=(proc.pid, done, peaks), daemon=True)
        measure = (
            "summed RSS of the converter and its workers (peak of 0.1 s samples); largest process: VmHWM"
        )
    except ImportError:
        watcher = None
        measure = "largest child process peak RSS (getrusage ru_maxrss; no per-tree sum without psutil)"
    if watcher is not None:
        watcher.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    if watcher is not None:
        watcher.join()
    else:
        peaks["process"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        raise SystemExit(f"error: the converter exited with status {proc.returncode}: {shlex.join(cmd)}")
    return {"wall_s": wall, "summary": stdout.strip(), "peak_tree_bytes": peaks["tree"] or None,
            "peak_process_bytes": peaks["process"], "memory_measure": measure}  # fmt: skip


def stored_images(folder: Path, count: int) -> list[bytes]:
    """The first `count` images of the folder's shards (shards are a seeded random draw: a fair sample)."""
    manifest = sharding.read_manifest(folder)
    images: list[bytes] = []
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["tar"]) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    images.append(tar.extractfile(member).read())
                    if len(images) == count:
                        return images
    return images


def decode_times(images: list[bytes], sizes: list[int], stored: int | None) -> dict[str, Any]:
    """Median µs per image of a PIL decode to RGB (as the torch loader does), and of decode + the loader's bilinear
    squash to each training size the folder serves (a folder stored at N serves N and smaller)."""

    def median_us(fn) -> float:
        fn(images[0])  # warm-up: first-call costs are not per image
        times = []
        for data in images:
            t = time.perf_counter()
            fn(data)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    def decode(data: bytes) -> Image.Image:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")

    squash = {
        s: median_us(lambda d, s=s: decode(d).resize((s, s), Image.BILINEAR))
        for s in sizes
        if stored is None or stored >= s
    }
    with Image.open(io.BytesIO(images[0])) as im:
        width, height = im.size
    return {"decode_us": median_us(decode), "decode_squash_us": squash, "stored_wh": [width, height],
            "decode_sample": len(images)}  # fmt: skip


def project(row: dict[str, Any], workers: int) -> dict[str, Any]:
    """Full VQA v2 train2014 + val2014 from one measured conversion. Shards scale with questions (every sample holds
    its own copy of the image); time is scaled by questions too: the generated set has VQA v2's ~5.4 questions per
    image, so scaling by images instead (the image phase dominates with --image-size) differs little
    (docs/data_pipeline.md). The
    16-core figure scales the time linearly with cores: an estimate, not a measurement."""
    per_question_s = row["wall_s"] / row["questions"]
    splits = {}
    for split, (questions, images) in FULL_VQA2.items():
        seconds = per_question_s * questions
        splits[split] = {"questions": questions, "images": images, "seconds": seconds,
                         "seconds_16_cores_estimate": seconds * workers / PROJECTED_CORES,
                         "bytes": row["bytes_per_question"] * questions}  # fmt: skip
    total = {k: sum(s[k] for s in splits.values()) for k in next(iter(splits.values()))}
    return {**splits, "total": total}


def measure_setting(raw: synthetic.Vqa2Files, out: Path, size: int | None, args: argparse.Namespace) -> dict:
    """One conversion: run it, read its manifest, time decoding its stored images, project it."""
    label = "as is" if size is None else f"--image-size {size}"
    print(f"converting ({label}) ...", file=sys.stderr)
    argv = convert_argv(raw, out, args.workers, size)
    run = run_measured(argv, not args.no_progress)
    manifest = sharding.read_manifest(out)
    totals = manifest["totals"]
    row = {"setting": label, "image_size": size, "command": "python -m data_pipeline.convert " + shlex.join(argv),
           **run, "questions": totals["samples"], "images": totals["images"], "shards": totals["shards"],
           "shard_bytes": totals["bytes"], "bytes_per_question": totals["bytes"] / totals["samples"],
           "images_per_s": totals["images"] / run["wall_s"], "questions_per_s": totals["samples"] / run["wall_s"]}  # fmt: skip
    row.update(decode_times(stored_images(out, args.decode_samples), args.sizes, size))
    row["projection"] = project(row, args.workers)
    if not args.keep:
        shutil.rmtree(out)
    return row


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def table(report: dict[str, Any]) -> list[str]:
    """The report as markdown: the measured conversions, then the full VQA v2 projection."""
    m, d, sizes = report["machine"], report["data"], report["sizes"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, "
        f"Pillow {m['pillow']}; {report['date']}; load average {report['load_before']:.2f} before, "
        f"{report['load_after']:.2f} after",
        f"data: {d['images']} generated photo-like 640x480 JPEGs ({d['image_kib']:.0f} KiB on average), "
        f"{d['questions']} questions ({d['questions'] / d['images']:.2f} per image), official VQA v2 JSON; "
        f"generated in {d['generate_s']:.0f} s; converter: {report['workers']} workers",
        "",
        "| setting | wall s | images/s | questions/s | shard GB | KiB/question | peak RSS MiB (tree / largest) "
        "| decode µs/image | " + " | ".join(f"decode + squash to {s} µs" for s in sizes) + " |",
        "|---" * (8 + len(sizes)) + "|",
    ]
    for r in report["results"]:
        tree = f"{r['peak_tree_bytes'] / 2**20:.0f}" if r["peak_tree_bytes"] else "-"
        squash = [f"{r['decode_squash_us'][s]:.0f}" if s in r["decode_squash_us"] else "-" for s in sizes]
        lines.append(
            f"| {r['setting']} | {r['wall_s']:.1f} | {r['images_per_s']:.1f} | {r['questions_per_s']:.0f} "
            f"| {r['shard_bytes'] / 1e9:.2f} | {r['bytes_per_question'] / 1024:.1f} "
            f"| {tree} / {r['peak_process_bytes'] / 2**20:.0f} | {r['decode_us']:.0f} | "
            + " | ".join(squash)
            + " |"
        )
    full = " + ".join(f"{k} {q:,} questions / {i:,} images" for k, (q, i) in FULL_VQA2.items())
    lines += [
        "",
        f"projected full VQA v2 ({full}); bytes and time scale with questions",
        "",
        f"| setting | train2014 GB | val2014 GB | total GB | time, {report['workers']} workers "
        f"| time, {PROJECTED_CORES} cores (linear estimate) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        p = r["projection"]
        lines.append(
            f"| {r['setting']} | {p['train2014']['bytes'] / 1e9:.1f} | {p['val2014']['bytes'] / 1e9:.1f} "
            f"| {p['total']['bytes'] / 1e9:.1f} | {_hours(p['total']['seconds'])} "
            f"| {_hours(p['total']['seconds_16_cores_estimate'])} |"
        )
    lines.append(f"peak memory: {report['results'][0]['memory_measure']}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.tools.convert_bench",
        description="Time `python -m data_pipeline.convert vqa2` on a generated COCO-like VQA v2 set, with images "
        "as they are and with each --image-size: wall time, images/s, questions/s, shard bytes, peak memory, "
        "decode time per stored image, and the full VQA v2 conversion projected from it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", type=int, default=5000, help="generated 640x480 images")
    p.add_argument("--questions-per-image", type=float, default=5.4, help="VQA v2 train2014: 5.36")
    p.add_argument("--workers", type=int, default=build.default_workers(), help="converter processes")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[384, 224],
        help="--image-size settings converted besides 'as is'",
    )
    p.add_argument("--decode-samples", type=int, default=200, help="stored images decoded per setting")
    p.add_argument("--work-dir", help="where the set and shards go (default: a temporary folder, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the generated set and every shard folder")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p


def _check_space(work: Path, args: argparse.Namespace) -> None:
    """Refuse to start without room for the set and the largest shard folder (every folder with --keep)."""
    raw = args.images * GENERATED_IMAGE_KIB * 1024
    shards = raw * args.questions_per_image * (1 + len(args.sizes) if args.keep else 1)
    need, free = raw + shards, shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(f"error: {work}: needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    _check_space(work, args)
    report: dict[str, Any] = {
        "command": "python -m data_pipeline.tools.convert_bench " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %z"),
        "machine": machine(("torch", "pillow", "numpy")),
        "workers": args.workers,
        "sizes": args.sizes,
        "load_before": os.getloadavg()[0],
    }
    print(f"generating {args.images} photo-like 640x480 images ...", file=sys.stderr)
    t0 = time.perf_counter()
    raw = generate(work / "raw", args.images, args.questions_per_image, not args.no_progress)
    image_bytes = sum(p.stat().st_size for p in raw.images.iterdir())
    n_questions = len(json.loads(raw.questions.read_text())["questions"])
    report["data"] = {"images": args.images, "questions": n_questions, "image_kib": image_bytes / args.images / 1024,
                      "image_bytes": image_bytes, "generate_s": time.perf_counter() - t0}  # fmt: skip
    settings: list[int | None] = [None, *args.sizes]
    report["results"] = [
        measure_setting(raw, work / ("shards-as-is" if s is None else f"shards-{s}"), s, args)
        for s in settings
    ]
    report["load_after"] = os.getloadavg()[0]
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.images < 1 or args.questions_per_image <= 0 or args.workers < 1 or args.decode_samples < 1:
        raise SystemExit(
            "error: --images, --questions-per-image, --workers and --decode-samples must be positive"
        )
    if args.keep and not args.work_dir:
        raise SystemExit("error: --keep needs --work-dir (a temporary folder is always deleted)")
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        report = run(args, work)
        if not args.keep:
            shutil.rmtree(work / "raw")
    else:
        with tempfile.TemporaryDirectory(prefix="vqa-convert-bench-") as tmp:
            report = run(args, Path(tmp))
    print("\n".join(table(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
