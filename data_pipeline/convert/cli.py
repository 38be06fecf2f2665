"""Command line of the converters: source data -> WebDataset shard folders (see docs/data_pipeline.md).

    python -m data_pipeline.convert vqa2 --questions Q.json [--annotations A.json] --images DIR --out OUT
                                         [--answers answers.json] [--min-answer-count 9]
    python -m data_pipeline.convert vqa2-answers --annotations A1.json [A2.json ...] --out answers.json
    python -m data_pipeline.convert easyvqa --out OUT          # writes OUT/train and OUT/test
    python -m data_pipeline.convert subset --source DIR --count N --out OUT [--seed 0] [--shards 1]

Every conversion checks each image by decoding it, runs on all cores, shows progress, resumes after an
interruption, refuses to overwrite a finished folder without --overwrite, and ends with a one-line summary.
Errors are one line naming the file and field; the exit status is 2 for bad input, 1 for --strict rejections and
for a full disk (the conversion resumes where it stopped once there is room: run the same command again).
`subset` draws a fixed, seeded subset of a finished shard folder and copies its samples byte for byte (their images
were checked when that folder was written; data_pipeline/convert/subset.py): seconds, so it neither checks nor resumes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import shutil
import sys
from pathlib import Path

from common import atomic
from data_pipeline.convert import easyvqa, subset, vqa2
from data_pipeline.convert.build import (
    DEFAULT_SHARD_SIZE,
    ConversionError,
    build_shard_folder,
    default_workers,
    is_finished,
)

log = logging.getLogger(__name__)

EXAMPLES = """examples (VQA v2 as ViLT uses it: one vocabulary from train + val, shared by every split):
  python -m data_pipeline.convert vqa2-answers --annotations v2_mscoco_train2014_annotations.json \\
      v2_mscoco_val2014_annotations.json --out data/vqa2/answers.json
  python -m data_pipeline.convert vqa2 --questions v2_OpenEnded_mscoco_train2014_questions.json \\
      --annotations v2_mscoco_train2014_annotations.json --images train2014 \\
      --answers data/vqa2/answers.json --out data/vqa2/train
  python -m data_pipeline.convert easyvqa --out data/easy-vqa
  python -m data_pipeline.convert subset --source data/easy-vqa/test --count 500 --out data/easy-vqa/test-500

'COMMAND --help' lists a command's options. Details: docs/data_pipeline.md."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help="samples per shard at most (sizes are balanced)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random order of samples over shards")
    p.add_argument(
        "--workers", type=int, default=default_workers(), help="processes for image checks and shard writing"
    )
    p.add_argument(
        "--strict", action="store_true", help="fail on any rejected question instead of leaving it out"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a finished (or differently made) output folder"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="store every image squashed to N x N (bilinear, as the loaders resize) as a JPEG: smaller shards and no "
        "resize when training at N; training at a larger size is refused (default: images as they are)",
    )
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of re-encoded images (1-100)")
    p.add_argument(
        "--chroma-subsampling",
        choices=["4:2:0", "4:4:4"],
        default=None,
        help="chroma of re-encoded images (default: 4:4:4 for easy-VQA's flat colour shapes, 4:2:0 for photos)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.convert",
        description="Convert VQA data into WebDataset tar shards + DALI index files + answers.json + manifest.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser(
        "vqa2", help="one VQA v2 split (official JSON files + COCO images)", formatter_class=fmt
    )
    p.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<split>_questions.json")
    p.add_argument("--annotations", help="v2_mscoco_<split>_annotations.json (leave out for test/test-dev)")
    p.add_argument("--images", required=True, help="folder of COCO_<split>_<12-digit id>.jpg")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument(
        "--answers",
        help="reuse this answers.json (e.g. train+val's from vqa2-answers) instead of building one",
    )
    p.add_argument(
        "--min-answer-count", type=int, default=9, help="keep majority answers seen at least this often"
    )
    p.add_argument(
        "--skip-out-of-vocab",
        action="store_true",
        help="leave out questions none of whose answers is in the vocabulary (ViLT does, for training only: "
        "the official metric counts them, so never for evaluation splits)",
    )
    _common(p)

    p = sub.add_parser(
        "vqa2-answers", help="build one answer vocabulary from several annotation files", formatter_class=fmt
    )
    p.add_argument(
        "--annotations",
        required=True,
        nargs="+",
        help="v2_mscoco_*_annotations.json files (ViLT: train + val)",
    )
    p.add_argument("--out", required=True, help="answers.json to write")
    p.add_argument(
        "--min-answer-count", type=int, default=9, help="keep majority answers seen at least this often"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = sub.add_parser(
        "easyvqa", help="the easy-VQA data set shipped by the easy-vqa package", formatter_class=fmt
    )
    p.add_argument(
        "--out", required=True, help="output folder; train/ and test/ shard folders are written in it"
    )
    _common(p)
    _add_subset(sub, fmt)
    return parser


def _add_subset(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "subset",
        help="a fixed, seeded subset of a shard folder as a shard folder of its own (e.g. a validation subset)",
        formatter_class=fmt,
    )
    p.add_argument("--source", required=True, help="the shard folder to draw from")
    p.add_argument("--count", required=True, type=int, help="questions in the subset")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument(
        "--shards", type=int, default=1, help="shards to write (at least one per rank that reads it)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished output folder")


def _settings(args: argparse.Namespace, argv: list[str]) -> dict:
    if args.workers < 1:
        raise ConversionError(f"--workers must be >= 1, got {args.workers}")
    return {
        "shard_size": args.shard_size,
        "seed": args.seed,
        "workers": args.workers,
        "strict": args.strict,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
        "image_size": args.image_size,
        "jpeg_quality": args.jpeg_quality,
        "chroma_subsampling": args.chroma_subsampling,
        "command": "python -m data_pipeline.convert " + shlex.join(argv),
    }


def _run(args: argparse.Namespace, argv: list[str]) -> list[str]:
    if args.command == "vqa2-answers":
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise ConversionError(f"{out}: exists; pass --overwrite to replace it")
        vocab = vqa2.build_answer_vocabulary(args.annotations, args.min_answer_count)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out, vocab)
        return [f"{len(vocab)} answers (majority answer count >= {args.min_answer_count}) -> {out}"]
    if args.command == "subset":
        summary = subset.write_subset(
            args.source,
            args.out,
            count=args.count,
            seed=args.seed,
            n_shards=args.shards,
            overwrite=args.overwrite,
            command="python -m data_pipeline.convert " + shlex.join(argv),
        )
        return [summary.line()]
    settings = _settings(args, argv)
    if args.command == "vqa2":
        spec = vqa2.make_spec(
            questions=args.questions,
            annotations=args.annotations,
            images=args.images,
            out=args.out,
            answers_file=args.answers,
            min_answer_count=args.min_answer_count,
            skip_out_of_vocab=args.skip_out_of_vocab,
            **settings,
        )
        return [build_shard_folder(spec).line()]
    # easyvqa: two folders; a split finished by an interrupted earlier run is kept (resume), unless --overwrite.
    root = Path(args.out)
    outs = {split: root / split for split in easyvqa.SPLITS}
    if all(is_finished(o) for o in outs.values()) and not args.overwrite:
        raise ConversionError(
            f"{root}: already holds a finished conversion (train/ and test/); pass --overwrite to replace it"
        )
    lines = []
    for split, out in outs.items():
        if is_finished(out) and not args.overwrite:
            lines.append(f"{split}: already finished in {out}, kept")
            continue
        lines.append(build_shard_folder(easyvqa.make_spec(split, out, **settings)).line())
    return lines


def out_of_space(exc: OSError, out: str | None) -> str:
    """One line for a full disk: where, how much is free, and that a rerun resumes (finished shards are kept)."""
    where = Path(exc.filename or out or ".")
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free / 2**30
    return (
        f"{where}: no space left on the device ({free:.1f} GiB free there); the shards written so far are kept: "
        f"free some space and run the same command again to resume"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        lines = _run(args, argv)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if str(exc).startswith("--strict") else 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"error: {out_of_space(exc, getattr(args, 'out', None))}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
