"""`python -m trainer.checkpoint`: convert a checkpoint for another world size (`to-universal`), list a run's.

Different world size: DeepSpeed refuses a ZeRO checkpoint written by another number of ranks. Convert it once,

    python -m trainer.checkpoint to-universal --run-dir RUN [--tag global_step<N>]

which runs `python -m deepspeed.checkpoint.ds_to_universal --input_folder RUN/checkpoints/<tag> --output_folder
RUN/checkpoints/<tag>_universal --inject_missing_state`, copies the trainer's side files and marks it COMPLETE; then
resume with `--resume <tag>_universal` on any number of ranks (the trainer sets `"checkpoint": {"load_universal":
true}` in the DeepSpeed config for it). A checkpoint written at ZeRO stage 0 (one rank) holds no ZeRO shards and is
refused (trainer/checkpoint/layout.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainer.checkpoint.layout import (
    COMPLETE,
    STATE_FILE,
    UNIVERSAL_SUFFIX,
    is_complete,
    list_complete,
    read_state,
    remove_checkpoint,
    stage0_reshard_message,
    write_complete_marker,
    written_zero_stage,
)
from trainer.config.config import ConfigError


def to_universal(run_dir: Path, tag: str | None = None) -> Path:
    """Convert a complete checkpoint to DeepSpeed's universal format next to it; returns the new folder."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag is None:
        refs = [r for r in list_complete(ckpt_dir) if not r.universal]
        if not refs:
            raise ConfigError(f"no complete checkpoint in {ckpt_dir}")
        tag = refs[-1].tag
    src = ckpt_dir / tag
    if not is_complete(src):
        raise ConfigError(f"{src} is not a complete checkpoint (no {COMPLETE} marker)")
    if written_zero_stage(src) == 0:
        raise ConfigError(stage0_reshard_message(tag, read_state(src)["world_size"]))
    dst = ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    remove_checkpoint(dst)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(src),
        "--output_folder",
        str(dst),
        "--inject_missing_state",
        "--num_extract_workers",
        str(max(1, min(4, os.cpu_count() or 1))),
        "--num_merge_workers",
        "1",
    ]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    for f in src.iterdir():
        if f.name == STATE_FILE or f.name.startswith("rng_rank"):
            shutil.copy2(f, dst / f.name)
    marker = {"tag": dst.name, "step": read_state(src)["step"], "universal_from": tag, "time": time.time()}
    write_complete_marker(dst, marker)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.checkpoint",
        description="Checkpoint tools. to-universal: convert a ZeRO checkpoint so that a run with a different "
        "number of ranks can resume from it (then: --resume <tag>_universal).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-universal", help="convert RUN/checkpoints/TAG into RUN/checkpoints/TAG_universal")
    p.add_argument("--run-dir", required=True, type=Path, help="the run folder (holds checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint to convert (default: the newest complete one)")
    p = sub.add_parser("list", help="list the complete checkpoints of a run")
    p.add_argument("--run-dir", required=True, type=Path, help="the run folder (holds checkpoints/)")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-universal":
            dst = to_universal(args.run_dir, args.tag)
            print(f"universal checkpoint: {dst}\nresume with: --resume {dst.name}")
        else:
            for r in list_complete(args.run_dir / "checkpoints"):
                kind = "universal" if r.universal else f"{r.world_size} ranks"
                print(f"{r.tag}\tstep {r.step}\t{kind}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
