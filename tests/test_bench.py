"""`python -m trainer.tools.bench` on the CPU: the tiny preset through its three modes (the DeepSpeed engine on an on-device
batch, real shards through build_loader, plain AdamW), the table and the JSON file; the FLOP count; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.tools.bench.cli import main
from trainer.tools.bench.measure import count_step_flops


@pytest.mark.slow
def test_bench_tiny_preset_all_modes(tiny_easyvqa_shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--repeats", "3",
        "--train-data", str(tiny_easyvqa_shards / "train"), "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["variant"], r["image_size"], r["mode"]) for r in rows] == [
        ("clip-infonce-dot", 64, "synthetic"),
        ("clip-infonce-dot", 64, "shards"),
        ("clip-infonce-dot", 64, "plain"),
    ]
    peaks = report["matmul_peak_flops_per_s"]
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())
    assert report["deepspeed_config_file"].endswith(
        "stage0_fp32.json"
    )  # the default, for one rank or several
    assert report["n_answers"] == len(
        json.loads((tiny_easyvqa_shards / "train" / "answers.json").read_text())
    )
    assert report["command"].startswith("python -m trainer.tools.bench --preset tiny")
    for r in rows:
        assert len(r["windows"]) == 3
        assert r["batch_size"] == 8 and r["precision"] == "fp32"
        # With an odd number of windows the medians come from the same window: samples/s = batch / step time.
        assert r["samples_per_s"] == pytest.approx(8 / r["step_time_s"], rel=1e-9)
        assert r["flops_per_step"] == rows[0]["flops_per_step"] > 0  # the same model in every mode
        assert 0 < r["mfu"] < 1, r["mfu"]  # a peak measured before the CPU warmed up read as MFU over 100%
        assert r["flops_per_sample"] == pytest.approx(r["flops_per_step"] / 8)
        # On the CPU the basis is the fastest measured product (bf16 is emulated, slower, on most CPUs).
        assert r["mfu_basis"] == max(peaks, key=peaks.get) and r["peak_flops_per_s"] == max(peaks.values())
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / r["peak_flops_per_s"])
        # No upper bound: on a busy CPU the measured peak (the best of a few timings) can fall below what a longer
        # step sustains, which puts MFU over 1; the formula above is what is checked.
        assert r["mfu"] > 0
        assert 0 <= r["data_wait_fraction"] <= 1
        assert "RSS" in r["memory_measure"] and r["peak_memory_bytes"] > 100 * 2**20
        assert r["first_step_s"] > 0 and r["epoch_restarts"] == 0  # 16 batches an epoch, 7 steps a cell
    # One rank runs without ZeRO (trainer/engine/engine.py `resolve_ds_config`): stage 0, the default file's stage.
    assert [r["engine"] for r in rows] == ["DeepSpeed ZeRO-0 float32"] * 2 + ["torch AdamW, fp32"]
    assert rows[0]["loader"] == rows[2]["loader"] == "on-device batch"
    assert rows[1]["loader"] in ("dali-cpu", "torch")

    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    for column in ("samples/s", "step ms", "peak mem GiB (RSS)", "GFLOP/sample", "MFU", "data wait"):
        assert column in header
    for r in rows:
        line = next(x for x in table.splitlines() if x.startswith(f"| clip-infonce-dot | 64 | {r['mode']} |"))
        assert f"| {r['samples_per_s']:.1f} |" in line and f"| {r['mfu'] * 100:.2f}% |" in line
    assert "MFU basis: measured 512x512 matrix-product peak" in table
    assert "peak memory: process peak RSS (VmHWM)" in table
    assert f"results: {out}" in table


class AttentionToy(nn.Module):
    """A linear layer and one attention: FLOPs known in closed form."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["pixels"]  # [b, s, d], no gradient
        b, s, d = x.shape
        h = self.proj(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)
        return {"loss": F.scaled_dot_product_attention(h, h, h).sum()}


def test_step_flops_count_attention_on_the_cpu() -> None:
    b, s, d, heads = 2, 16, 32, 4
    toy = AttentionToy(d, heads)
    flops = count_step_flops(toy, {"pixels": torch.randn(b, s, d)})
    linear = 2 * b * s * d * d  # forward; backward only the weight's gradient (the input needs none)
    one_bmm = 2 * b * heads * s * s * (d // heads)
    # torch's attention formulas: 2 products forward, 5 backward (scores recomputed).
    assert flops == 2 * linear + 2 * one_bmm + 5 * one_bmm
    assert all(p.grad is None for p in toy.parameters())  # the counting step leaves no gradient behind


def test_bench_refuses_what_cannot_run(tmp_path: Path, capsys) -> None:
    assert main(["--modes", "shards", "--out", str(tmp_path / "x.json")]) == 2
    assert "--modes shards needs --train-data DIR" in capsys.readouterr().err
    assert main(["--variants", "vilt-large", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown variant 'vilt-large'" in capsys.readouterr().err
    assert main(["--steps", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["--modes", "none", "--out", str(tmp_path / "x.json")]) == 2
    assert "--modes none leaves nothing to time: add --hf-vilt" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for option in ("--variants", "--image-sizes", "--preset", "--batch-size", "--steps", "--warmup", "--repeats",
                   "--train-data", "--modes", "--out"):  # fmt: skip
        assert option in usage


@pytest.mark.slow
def test_bench_times_transformers_vilt_alone(tmp_path: Path) -> None:
    """`--modes none --hf-vilt`: transformers' ViltForQuestionAnswering at the preset's ViLT shape, in the plain
    mode, eager, and nothing else (the GPU check runs it as its own time-limited stage)."""
    out = tmp_path / "bench.json"
    argv = [
        "--preset", "tiny", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "1",
        "--modes", "none", "--hf-vilt", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["complete"]
    [row] = report["results"]
    assert (row["variant"], row["image_size"], row["mode"], row["compile"]) == (
        "transformers-vilt",
        64,
        "plain",
        False,
    )
    assert row["samples_per_s"] > 0 and row["flops_per_step"] > 0
