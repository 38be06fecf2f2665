"""A small VQA v2-format shard folder made from scratch (data_pipeline.convert.synthetic + the real converter): the folder
most data tests read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.convert import cli as convert
from data_pipeline.convert import synthetic


def convert_synthetic(root: Path, *, shard_size: int = 5, **write_kw: Any) -> Path:
    """`synthetic.write_vqa2(root / "raw", **write_kw)` converted into `root / "shards"` (every answer kept)."""
    raw = synthetic.write_vqa2(root / "raw", **write_kw)
    out = root / "shards"
    args = ["vqa2", "--questions", str(raw.questions), "--annotations", str(raw.annotations)]
    args += ["--images", str(raw.images), "--out", str(out), "--min-answer-count", "1"]
    assert convert.main([*args, "--shard-size", str(shard_size), "--workers", "1", "--no-progress"]) == 0
    return out
