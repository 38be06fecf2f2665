"""`python -m trainer.tools.bench --ranks 2` on the CPU (2 spawned gloo ranks, the tiny preset): the engine's default, torch
DDP and ZeRO-2 in one interleaved run; the report's host work tells the modes apart; bad input fails plainly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.tools.bench.cli import main
from trainer.tools.bench.ranks_report import format_table


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_ranks_time_the_default_ddp_and_zero2_and_show_their_host_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ranks.json"
    argv = [
        "--ranks", "2", "--preset", "tiny", "--answers", "7", "--cells", "stage0-overlap,ddp,zero2",
        "--steps", "1", "--warmup", "1", "--repeats", "2", "--profile-steps", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["ranks"], report["backend"], report["global_batch"]) == (2, "gloo", 16)
    rows = {r["cell"]: r for r in report["results"]}
    assert list(rows) == ["stage0-overlap", "ddp", "zero2"]
    assert rows["stage0-overlap"]["engine"].startswith("DeepSpeed ZeRO-0 float32; all-reduce overlapped")
    assert rows["zero2"]["engine"].startswith("DeepSpeed ZeRO-2")
    assert rows["ddp"]["vs_ddp"] == 1.0
    for r in rows.values():
        assert len(r["samples_per_s_windows"]) == 2 and r["samples_per_s"] > 0
        p = r["profile"]
        assert p["reduction_ms_per_step"] > 0 and 0 <= p["reduction_overlap_fraction"] <= 1
    n_params = sum(1 for _ in _trainable_tensors())
    default, ddp, zero2 = (rows[c]["profile"] for c in ("stage0-overlap", "ddp", "zero2"))
    # ZeRO-2: a Python hook per parameter and a norm per gradient tensor, every step.
    assert zero2["python_calls_from_autograd_per_step"]["stage_1_and_2.py:grad_handling_hook"] == n_params
    assert zero2["per_tensor_norms_per_step"] > 0
    # The default, as DDP: no Python call per parameter, no per-tensor norm (a non-logging step), no more host reads.
    for p in (default, ddp):
        assert max(p["python_calls_from_autograd_per_step"].values()) < 10, p[
            "python_calls_from_autograd_per_step"
        ]
        assert p["per_tensor_norms_per_step"] == 0
    assert default["host_syncs_per_step"] == ddp["host_syncs_per_step"]
    assert "stage0-overlap" in format_table(report) and "samples/s" in capsys.readouterr().out


def _trainable_tensors():
    from tests.helpers.tiny import tiny_config
    from trainer.config.config import apply_overrides
    from trainer.config.presets import get_preset
    from trainer.modeling.task import build_task

    cfg = apply_overrides(get_preset("tiny"), ["model.vilt_pretrained=none", "model.clip_pretrained=none"])
    assert cfg.model.variant == tiny_config("clip-infonce-dot").model.variant
    task = build_task(cfg, n_answers=7, vilt_vocab_size=cfg.model.wordpiece_vocab_size)
    return [p for p in task.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ranks", "1"], "--ranks must be >= 2"),
        (["--ranks", "2", "--cells", "zero9"], "--cells: unknown cell"),
        (["--ranks", "2", "--steps", "0"], "--steps must be >= 1"),
        (["--ranks", "2", "--preset", "nope"], "nope"),
    ],
)
def test_bad_arguments_fail_with_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
