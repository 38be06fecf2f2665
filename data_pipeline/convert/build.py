"""One conversion run: candidate samples in, a finished shard folder out (checked, resumable, atomic).

The source readers (vqa2.py, easyvqa.py) turn their files into `Candidate`s (the sample json plus the path of its
image) and reader-level rejections; `build_shard_folder` does the rest, the same way for every source:

1. refuse a finished folder (manifest.json present) unless `overwrite`; refuse to resume an unfinished one made
   with other inputs or settings (a fingerprint in `.work/settings.json`);
2. check every distinct image on all cores by decoding it (or convert it to JPEG once, for PNG sources); results
   are appended to `.work/checks.jsonl` as they arrive, so an interrupted run does not redo them;
3. drop the questions whose image failed, listing each with its reason; `strict` turns any rejection into an error;
4. spread the accepted samples over shards in a seeded random order (shard sizes differ by at most one), and
   write the shards on all cores: index, then tar, then a `.work/done/` record, each atomically; a rerun
   skips the shards that have a record;
5. write answers.json, then manifest.json last, and delete `.work`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import atomic
from common.progress import progress_bar
from data_pipeline.convert.buildspec import (
    CHROMA_SUBSAMPLING,
    DEFAULT_SHARD_SIZE,
    BuildSpec,
    Candidate,
    ConversionError,
    Summary,
)
from data_pipeline.convert.images import CheckResult, check_image, convert_to_jpeg
from data_pipeline.shards import format as shards

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "BuildSpec",
    "Candidate",
    "ConversionError",
    "Summary",
    "build_shard_folder",
    "clear_output",
    "default_workers",
    "is_finished",
]

log = logging.getLogger(__name__)

WORK = ".work"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_finished(out: Path) -> bool:
    return (out / shards.MANIFEST).is_file()


def clear_output(out: Path) -> None:
    """Delete what a conversion writes in `out` (only our own file names), for --overwrite."""
    for pattern in ("shard-*.tar", "shard-*.idx", "*.tmp-*", shards.ANSWERS, shards.MANIFEST):
        for p in out.glob(pattern):
            p.unlink()
    shutil.rmtree(out / WORK, ignore_errors=True)


def _parallel_map(fn: Callable, tasks: list, workers: int, chunksize: int = 1) -> Iterator:
    """Unordered map on `workers` processes (spawned: the parent may hold threads, e.g. DALI's or torch's)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(fn, tasks, chunksize=chunksize)


def _fingerprint(spec: BuildSpec) -> str:
    h = hashlib.sha256()
    settings = {
        "source": spec.source,
        "split": spec.split,
        "image_mode": spec.image_mode,
        "image_size": spec.image_size,
        "jpeg_quality": spec.jpeg_quality,
        "chroma_subsampling": spec.chroma_subsampling,
        "shard_size": spec.shard_size,
        "seed": spec.seed,
        "inputs": spec.inputs,
        "answers": spec.answers,
        "rejected": spec.rejected,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for c in spec.candidates:
        h.update(json.dumps([c.meta, c.image], sort_keys=True).encode())
    return h.hexdigest()


def _prepare_work(spec: BuildSpec) -> Path:
    out = spec.out
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder (--out)")
    if is_finished(out):
        if not spec.overwrite:
            raise ConversionError(
                f"{out}: already holds a finished conversion ({shards.MANIFEST}); pass --overwrite to replace it"
            )
        log.info("%s: --overwrite: deleting the previous conversion", out)
        clear_output(out)
    work = out / WORK
    fingerprint = _fingerprint(spec)
    settings_file = work / "settings.json"
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text()).get("fingerprint")
        if previous != fingerprint:
            if not spec.overwrite:
                raise ConversionError(
                    f"{out}: holds an unfinished conversion made from other inputs or settings; "
                    "pass --overwrite to start again"
                )
            clear_output(out)
        else:
            log.info("%s: resuming an interrupted conversion", out)
    elif spec.overwrite:
        clear_output(out)
    (work / "done").mkdir(parents=True, exist_ok=True)
    (work / "images").mkdir(exist_ok=True)
    atomic.write_json(settings_file, {"fingerprint": fingerprint})
    removed = shards.remove_temporaries(out) + shards.remove_temporaries(work / "images")
    if removed:
        log.info("%s: removed %d half-written files of an interrupted run", out, removed)
    return work


def _load_checks(path: Path) -> dict[str, CheckResult]:
    done: dict[str, CheckResult] = {}
    if not path.is_file():
        return done
    with open(path) as f:
        for line in f:
            try:
                r = CheckResult(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # the last line of an interrupted run may be cut short
            done[r.path] = r
    return done


def _converted_name(source: str) -> str:
    return f"{Path(source).stem}-{hashlib.sha1(source.encode()).hexdigest()[:12]}.jpg"


def _check_images(spec: BuildSpec, work: Path) -> dict[str, CheckResult]:
    """Phase 1: decode (or convert) every distinct image once, on all cores, remembering results across runs."""
    log_path = work / "checks.jsonl"
    results = _load_checks(log_path)
    if spec.image_mode == "jpeg":
        # A converted JPEG deleted since (or never renamed into place) is redone.
        results = {p: r for p, r in results.items() if not r.ok or Path(r.output).is_file()}
    todo = sorted({c.image for c in spec.candidates} - results.keys())
    if results:
        log.info("%s: %d images already checked, %d to go", spec.out, len(results), len(todo))
    if spec.image_mode == "jpeg":
        fn: Callable = convert_to_jpeg
        size, quality, chroma = (
            spec.image_size,
            spec.jpeg_quality,
            CHROMA_SUBSAMPLING[spec.chroma_subsampling],
        )
        tasks: list = [(p, str(work / "images" / _converted_name(p)), size, quality, chroma) for p in todo]
    else:
        fn, tasks = check_image, todo
    chunk = max(1, min(64, len(tasks) // (spec.workers * 8) if spec.workers else 1))
    bar = progress_bar(spec.progress, total=len(tasks), desc=f"{spec.split}: check images", unit="img")
    with open(log_path, "a") as logf, bar:
        for r in _parallel_map(fn, tasks, spec.workers, chunk):
            results[r.path] = r
            logf.write(json.dumps(asdict(r)) + "\n")
            bar.update()
    return results


def _write_shard(task: tuple[str, str, str, list[tuple[str, dict, str]]]) -> dict[str, Any]:
    """Worker: one shard's index, tar and done record, each written atomically (in that order)."""
    tar_path, idx_path, done_path, samples = task

    def components() -> Iterable[tuple[str, dict[str, bytes]]]:
        for key, meta, image in samples:
            with open(image, "rb") as f:
                data = f.read()
            meta_bytes = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
            yield key, {"jpg": data, "json": meta_bytes}

    n = shards.write_shard(tar_path, idx_path, components())
    record = {
        "tar": Path(tar_path).name,
        "index": Path(idx_path).name,
        "samples": n,
        "bytes": os.path.getsize(tar_path),
        # Digests let `python -m data_pipeline.shards.verify` find damage that sizes cannot (bit rot, a bad copy).
        "sha256": shards.file_sha256(tar_path),
        "index_sha256": shards.file_sha256(idx_path),
    }
    atomic.write_json(done_path, record)
    return record


def _shard_done(out: Path, done_path: Path, expected_samples: int) -> dict[str, Any] | None:
    if not done_path.is_file():
        return None
    record = json.loads(done_path.read_text())
    tar, idx = out / record["tar"], out / record["index"]
    if record["samples"] != expected_samples or not idx.is_file() or not tar.is_file():
        return None
    if tar.stat().st_size != record["bytes"]:
        return None
    if "sha256" not in record:  # a done record from before digests were kept: add them now
        record = {**record, "sha256": shards.file_sha256(tar), "index_sha256": shards.file_sha256(idx)}
    return record


def _plan(accepted: list[Candidate], shard_size: int, seed: int) -> list[list[Candidate]]:
    """Seeded random order over shards of near-equal size (at most `shard_size`), so a shard is a fair sample."""
    order = sorted(accepted, key=lambda c: c.meta["question_id"])
    random.Random(seed).shuffle(order)
    n_shards = math.ceil(len(order) / shard_size)
    base, extra = divmod(len(order), n_shards)
    plan, start = [], 0
    for i in range(n_shards):
        size = base + (1 if i < extra else 0)
        plan.append(order[start : start + size])
        start += size
    return plan


def _reject_or_fail(spec: BuildSpec, rejected: list[dict[str, Any]], total: int) -> None:
    if rejected and spec.strict:
        first = rejected[0]
        raise ConversionError(
            f"--strict: {len(rejected)} of {total} questions rejected; first: question {first['question_id']}: "
            f"{first['reason']}"
        )


def build_shard_folder(spec: BuildSpec) -> Summary:
    """Run a whole conversion (see the module docstring); returns its summary."""
    t0 = time.perf_counter()
    if spec.shard_size < 1:
        raise ConversionError(f"--shard-size must be >= 1, got {spec.shard_size}")
    total = len(spec.candidates) + len(spec.rejected)
    _reject_or_fail(spec, spec.rejected, total)
    spec.out.mkdir(parents=True, exist_ok=True)
    work = _prepare_work(spec)
    accepted, rejected = _accept(spec, work, total)
    plan = _plan(accepted, spec.shard_size, spec.seed)
    shard_list = _write_shards(spec, plan, work)
    atomic.write_json(spec.out / shards.ANSWERS, spec.answers)
    manifest = _manifest(spec, total, accepted, rejected, shard_list)
    atomic.write_json(spec.out / shards.MANIFEST, manifest)  # last: a folder without it is unfinished
    shutil.rmtree(work, ignore_errors=True)
    samples, seconds = manifest["totals"]["samples"], time.perf_counter() - t0
    summary = Summary(spec.out, spec.split, samples, rejected, len(shard_list), seconds, spec.notes)
    log.debug("%s", summary.line())
    return summary


def _accept(spec: BuildSpec, work: Path, total: int) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """The questions whose image passed its check (with the image to write), and every rejected one, by id."""
    checks = _check_images(spec, work)
    rejected = list(spec.rejected)
    accepted = []
    for c in spec.candidates:
        r = checks[c.image]
        if r.ok:
            accepted.append(Candidate(c.meta, r.output))
        else:
            rejected.append(
                {"question_id": c.meta["question_id"], "image_id": c.meta["image_id"], "reason": r.reason}
            )
    rejected.sort(key=lambda r: r["question_id"])
    _reject_or_fail(spec, rejected, total)
    if not accepted:
        first = rejected[0]["reason"] if rejected else "no questions in the input"
        raise ConversionError(
            f"{spec.out}: nothing to write: all {total} questions rejected (first: {first})"
        )
    return accepted, rejected


def _write_shards(spec: BuildSpec, plan: list[list[Candidate]], work: Path) -> list[dict[str, Any]]:
    """Write every shard of `plan` not already finished by an earlier, interrupted conversion; their records."""
    records: dict[int, dict[str, Any]] = {}
    tasks = []
    for i, members in enumerate(plan):
        name = shards.shard_name(i)
        done = work / "done" / f"{name}.json"
        record = _shard_done(spec.out, done, len(members))
        if record is not None:
            records[i] = record
            continue
        samples = [(shards.sample_key(c.meta["question_id"]), c.meta, c.image) for c in members]
        tasks.append((str(spec.out / f"{name}.tar"), str(spec.out / f"{name}.idx"), str(done), samples))
    if records:
        log.info(
            "%s: %d of %d shards already written, %d to go", spec.out, len(records), len(plan), len(tasks)
        )
    bar = progress_bar(
        spec.progress, total=sum(len(t[3]) for t in tasks), desc=f"{spec.split}: write shards", unit="sample"
    )
    with bar:
        for record in _parallel_map(_write_shard, tasks, spec.workers):
            records[int(record["tar"].split("-")[1].split(".")[0])] = record
            bar.update(record["samples"])
    return [records[i] for i in range(len(plan))]


def _manifest(
    spec: BuildSpec,
    total: int,
    accepted: list[Candidate],
    rejected: list[dict[str, Any]],
    shard_list: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": shards.FORMAT_NAME,
        "version": shards.FORMAT_VERSION,
        "source": spec.source,
        "split": spec.split,
        "command": spec.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": spec.inputs,
        "settings": {
            "shard_size": spec.shard_size,
            "seed": spec.seed,
            "image_mode": spec.image_mode,
            "image_size": spec.image_size,
            "jpeg_quality": spec.jpeg_quality if spec.image_mode == "jpeg" else None,
            "chroma_subsampling": spec.chroma_subsampling if spec.image_mode == "jpeg" else None,
        },  # fmt: skip
        "answers": {"count": len(spec.answers), "source": spec.answers_source, "file": shards.ANSWERS},
        "has_answers": spec.has_answers,
        "totals": {
            "questions": total,
            "samples": sum(r["samples"] for r in shard_list),
            "rejected": len(rejected),
            "images": len({c.image for c in accepted}),
            "shards": len(shard_list),
            "bytes": sum(r["bytes"] for r in shard_list),
        },
        "shards": shard_list,
        "rejected": rejected,
        **spec.extra,
    }
