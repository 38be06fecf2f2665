"""`python -m data_pipeline.tools.bench`: images/s of each loader at 224 and 384 px on the machine it runs on, as one table.

By default it builds a temporary shard folder of photo-like 640x480 JPEGs (VQA v2's COCO images are ~640x480;
easy-VQA's 64x64 images would measure almost nothing but overhead) with the real converter, then times every
loader that can run here (dali-gpu where a GPU is present, dali-cpu, torch) in training mode: steady-state images/s
after the first batch, the median of several runs. Each loader takes its tokens from the folder's question table
(data_pipeline/loaders/questions.py, as the trainer does), or, with `--questions tokenize`, tokenises every batch with the
real QuestionTokenizer (data_pipeline.text); the tokeniser's own cost per batch is measured separately. For DALI the
table also gives the loader's host work per batch in this process (CPU time of its host thread: copies out of
DALI's buffers, ids, masks, targets) and the CPU time of the whole process per batch (DALI's CPU decoding
included). DALI's settings can be swept: `--workers` (its CPU threads), `--hw-decoder-load`, `--prefetch`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.machine import machine_line
from data_pipeline.convert import build, synthetic, vqa2
from data_pipeline.loaders import dali_loader
from data_pipeline.loaders.loader import LoaderSpec, build_loader, read_sample_info
from data_pipeline.loaders.questions import QuestionTable

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_photo_shards(root: Path, samples: int, workers: int) -> Path:
    """A shard folder of `samples` questions over photo-like 640x480 JPEGs (3 questions per image)."""
    n_images = max(1, samples // 3)
    raw = synthetic.write_vqa2(
        root / "raw", n_images=n_images, bad=False, sizes=(640, 640, 480, 480), photo_like=True
    )
    spec = vqa2.make_spec(
        questions=raw.questions,
        annotations=raw.annotations,
        images=raw.images,
        out=root / "shards",
        answers_file=None,
        min_answer_count=1,
        shard_size=256,
        workers=workers,
        progress=False,
    )
    build.build_shard_folder(spec)
    return root / "shards"


def make_tokenizer(folder: Path, work: Path) -> tuple[Callable, str]:
    questions = [m["question"] for m in read_sample_info(folder).values()]
    try:
        # data_pipeline.text brings transformers and open_clip (seconds): imported only when a tokenizer is built.
        from data_pipeline.text import QuestionTokenizer
    except ImportError as exc:
        raise SystemExit(f"error: data_pipeline.text.QuestionTokenizer is not importable ({exc})") from None
    tok = QuestionTokenizer.build(
        questions, work / "tokenizer", clip_arch="ViT-B-32", max_text_len=40, clip_context_length=77
    )
    return tok, "QuestionTokenizer (ViLT WordPiece, 40 tokens + open_clip ViT-B-32 BPE, 77 tokens)"


def time_loader(
    folder: Path,
    kind: str,
    size: int,
    *,
    tokenizer,
    batch_size: int,
    workers: int,
    epoch: int,
    max_batches: int,
    table: QuestionTable | None = None,
    hw_decoder_load: float = 0.65,
    prefetch: int = 2,
    host_workers: int = 0,
) -> tuple[str, float, float | None, float]:
    """(loader kind, images/s, host seconds per batch (DALI) or None, process CPU seconds per batch), steady state."""
    spec = LoaderSpec(
        tokenizer=tokenizer,
        batch_size=batch_size,
        image_size=size,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        train=True,
        seed=0,
        epoch=epoch,
        kind=kind,
        num_workers=workers,
        questions=table,
        hw_decoder_load=hw_decoder_load,
        prefetch_depth=prefetch,
        host_workers=host_workers,
    )
    loader = build_loader(folder, spec)
    t0, n, batches, cpu0, host0 = None, 0, 0, 0.0, (0.0, 0)
    for i, batch in enumerate(loader):
        if i > max_batches:
            break
        if (
            t0 is None
        ):  # the first batch carries the start-up (pipeline build, worker start): not steady state
            if batch["pixels"].is_cuda:
                torch.cuda.synchronize()
            t0, cpu0 = time.perf_counter(), time.process_time()
            host0 = loader.host_work
            continue
        n += batch["pixels"].shape[0]
        batches += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if t0 is None or n == 0:
        raise SystemExit(f"error: {folder} gives fewer than 2 batches of {batch_size}; use more --samples")
    rate, cpu = n / (time.perf_counter() - t0), (time.process_time() - cpu0) / batches
    host_s, host_batches = (now - before for now, before in zip(loader.host_work, host0, strict=True))
    host = host_s / host_batches if host_batches else None
    return loader.kind, rate, host, cpu


def time_tokenizer(tokenizer, folder: Path, batch_size: int, repeats: int = 20) -> float:
    questions = [m["question"] for m in read_sample_info(folder).values()][:batch_size]
    tokenizer(questions)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        tokenizer(questions)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.tools.bench",
        description="Images/s of each data loader (DALI GPU/CPU, PyTorch) at several image sizes, as one table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data", help="an existing shard folder to read (default: build photo-like 640x480 shards)"
    )
    p.add_argument("--samples", type=int, default=768, help="samples in the generated shard folder")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384], help="image sizes (px)")
    p.add_argument(
        "--kinds", nargs="+", default=["dali", "torch"], choices=["dali", "torch"], help="loaders to time"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[build.default_workers()],
        help="DataLoader workers / DALI CPU threads (several: a sweep)",
    )
    p.add_argument(
        "--questions",
        nargs="+",
        default=["table"],
        choices=["table", "tokenize"],
        help="tokens from the folder's question table (the trainer's way) or tokenised per batch",
    )
    p.add_argument("--hw-decoder-load", type=float, nargs="+", default=[0.65], help="dali-gpu (a sweep)")
    p.add_argument(
        "--prefetch", type=int, nargs="+", default=[2], help="DALI's prefetch queue depth (a sweep)"
    )
    p.add_argument(
        "--host-workers", type=int, default=0, help="DALI: host worker processes (--questions tokenize)"
    )
    p.add_argument("--runs", type=int, default=3, help="runs per cell; the table shows the median")
    p.add_argument("--max-batches", type=int, default=30, help="batches timed per run (after the first)")
    return p


def _settings(args: argparse.Namespace, kind: str) -> list[dict]:
    """The cells of one loader kind: the sweep's settings (DALI's only for DALI)."""
    cells = []
    for questions in args.questions:
        for workers in args.workers:
            if kind != "dali":
                cells.append({"questions": questions, "workers": workers})
                continue
            for load in args.hw_decoder_load:
                for prefetch in args.prefetch:
                    cells.append(
                        {
                            "questions": questions,
                            "workers": workers,
                            "hw_decoder_load": load,
                            "prefetch": prefetch,
                        }
                    )
    return cells


def _label(name: str, cell: dict, args: argparse.Namespace) -> str:
    shown = {k: v for k, v in cell.items() if k == "questions" or len(getattr(args, k)) > 1}
    if name == "dali-cpu":
        shown.pop("hw_decoder_load", None)  # the CPU decoder has no hardware share
    return name + "".join(f", {k} {v}" for k, v in shown.items())


def _run_cells(args, folder: Path, kinds: list[str], tokenizer, table: QuestionTable) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for kind in kinds:
        for cell in _settings(args, kind):
            for size in args.sizes:
                runs = []
                for r in range(args.runs):
                    name, rate, host, cpu = time_loader(
                        folder, kind, size, tokenizer=tokenizer, batch_size=args.batch_size,
                        workers=cell["workers"], epoch=r, max_batches=args.max_batches,
                        table=table if cell["questions"] == "table" else None,
                        hw_decoder_load=cell.get("hw_decoder_load", 0.65), prefetch=cell.get("prefetch", 2),
                        host_workers=args.host_workers,
                    )  # fmt: skip
                    runs.append((rate, host, cpu))
                    print(
                        f"  {_label(name, cell, args)} {size}px run {r + 1}: {rate:.0f} images/s",
                        file=sys.stderr,
                    )
                row = rows.setdefault(_label(name, cell, args), {})
                hosts = [h for _, h, _ in runs if h is not None]
                row[size] = (
                    statistics.median(r for r, _, _ in runs),
                    statistics.median(hosts) if hosts else None,
                    statistics.median(c for _, _, c in runs),
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    kinds = [k for k in args.kinds if k != "dali" or dali_loader.available()]
    with tempfile.TemporaryDirectory(prefix="vqa-bench-") as tmp:
        work = Path(tmp)
        if args.data:
            folder = Path(args.data)
            source = str(folder)
        else:
            print(f"building {args.samples} photo-like 640x480 samples ...", file=sys.stderr)
            folder = make_photo_shards(work, args.samples, max(args.workers))
            source = f"{args.samples} generated photo-like 640x480 JPEG samples (quality 90)"
        tokenizer, tok_name = make_tokenizer(folder, work)
        t = time.perf_counter()
        table = QuestionTable.build(str(folder), tokenizer)
        table_s = time.perf_counter() - t
        rows = _run_cells(args, folder, kinds, tokenizer, table)
        tok_s = time_tokenizer(tokenizer, folder, args.batch_size)
    print(f"machine: {machine_line(('torch', 'DALI'))}")
    print(
        f"data: {source}; batch {args.batch_size}; median of {args.runs} runs of {args.max_batches} batches"
    )
    cols = [
        f"{s} px {what}" for s in args.sizes for what in ("images/s", "host ms/batch", "process CPU ms/batch")
    ]
    print("| loader | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for name, cells in rows.items():
        out = []
        for s in args.sizes:
            rate, host, cpu = cells[s]
            out += [f"{rate:.0f}", "-" if host is None else f"{host * 1e3:.2f}", f"{cpu * 1e3:.1f}"]
        print(f"| {name} | " + " | ".join(out) + " |")
    per_q = tok_s / args.batch_size
    print(
        f"host tokenisation ({tok_name}): {tok_s * 1e3:.1f} ms per batch of {args.batch_size} "
        f"= {per_q * 1e6:.0f} us per question ({1 / per_q:.0f} questions/s on one core)"
    )
    print(f"question table: {len(table)} questions tokenised once in {table_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
