"""Training through the entry point (`trainer.main.main`, one rank in this process) in bf16, under ZeRO-3, and with
dropout: the weights move, the loss falls on a repeated batch, and a run checkpointed at step 2 and resumed there
logs the losses of the uninterrupted run.

- The shipped bf16 JSON on one rank runs at ZeRO stage 0 with fp32 weights and DeepSpeed's `torch_autocast` in bf16
  (trainer/engine/engine.py `plain_single_rank`).
- A bf16 JSON with a `torch_autocast` section of its own is kept as written: ZeRO (stage 2, and stage 3, which a
  single fp32 rank never keeps) with bf16 weights.
- Dropout > 0: the resumed run must continue the random stream the interrupted one saved, not the fresh seed.

The data: 8 easy-VQA training questions, one batch, seen every step.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from test_main_deepspeed import scalars

from trainer.main import REPO_ROOT, main

pytestmark = pytest.mark.slow

CONFIGS = REPO_ROOT / "deepspeed_configs"
STEPS = 4
TINY = [
    "--preset",
    "tiny",
    "--set",
    "train.global_batch_size=8",
    "--set",
    "train.micro_batch_size=8",
    "--set",
    "train.log_every=1",
    "--set",
    "train.progress_bar=false",
    "--set",
    "data.num_workers=1",
    "--set",
    "model.clip_text_vocab=compact",
]
TAGS = ("train/loss", "train/vqa_loss", "train/infonce_loss", "train/lr", "train/grad_norm")


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 easy-VQA training questions in one shard: with batch 8, every step trains on the same batch."""
    import dataclasses

    from data_pipeline.convert import easyvqa
    from data_pipeline.convert.build import build_shard_folder

    out = tmp_path_factory.mktemp("one_batch") / "train"
    spec = easyvqa.make_spec("train", out, shard_size=8, seed=0, workers=1, progress=False)
    build_shard_folder(dataclasses.replace(spec, candidates=spec.candidates[:8]))
    return out


def kept_json(tmp_path: Path, shipped: str) -> Path:
    """A shipped bf16 JSON with a `torch_autocast` section of its own: one rank keeps its ZeRO stage and bf16."""
    ds = json.loads((CONFIGS / shipped).read_text())
    ds["torch_autocast"] = {"enabled": False}
    path = tmp_path / f"kept_{shipped}"
    path.write_text(json.dumps(ds))
    return path


def train(run_dir: Path, data: Path, ds_json: Path, *extra: str, steps: int = STEPS) -> Path:
    argv = [*TINY, "--train-data", str(data), "--run-dir", str(run_dir), "--max-steps", str(steps)]
    argv += ["--set", "train.ckpt_every=2", "--deepspeed_config", str(ds_json), *extra]
    assert main(argv) == 0
    return run_dir


def resume(run_dir: Path, dst: Path, ds_json: Path, tag: str = "global_step2") -> Path:
    """A copy of the run as it was when `tag` was its newest checkpoint, resumed there and run to the end."""
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("events.out.tfevents.*", "eval"))
    step = int(tag.removeprefix("global_step"))
    for ckpt in (dst / "checkpoints").glob("global_step*"):
        if int(ckpt.name.removeprefix("global_step").split("_")[0]) > step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(tag)
    assert main(["--run-dir", str(dst), "--resume", tag, "--deepspeed_config", str(ds_json)]) == 0
    return dst


def state(run_dir: Path, tag: str) -> dict:
    return json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())


def assert_resumed_equal(full: Path, resumed: Path, tags: tuple[str, ...] = TAGS) -> None:
    a, b = scalars(full), scalars(resumed)
    assert sorted(b["train/loss"]) == list(range(3, STEPS + 1))  # continued from step 2, not from 0
    for tag in tags:
        for step in range(3, STEPS + 1):
            assert b[tag][step] == pytest.approx(a[tag][step], rel=1e-6, abs=1e-7), (tag, step)


def assert_trains(run_dir: Path) -> None:
    """Finite losses that fall on the repeated batch; every weight tensor but a few moved between steps 2 and 4."""
    import torch

    from trainer.serve.export import fp32_state_dict

    s = scalars(run_dir)
    assert sorted(s["train/loss"]) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in s["train/loss"].values())
    for tag in ("train/loss", "train/vqa_loss", "train/infonce_loss"):
        assert s[tag][STEPS] < s[tag][1], (tag, s[tag])
    before, after = fp32_state_dict(run_dir, "global_step2"), fp32_state_dict(run_dir, f"global_step{STEPS}")
    assert before.keys() == after.keys()
    floats = [k for k, v in before.items() if v.is_floating_point()]
    moved = [k for k in floats if not torch.equal(before[k], after[k])]
    assert len(moved) >= 0.9 * len(floats), sorted(set(floats) - set(moved))
    for key in ("model.classifier.3.weight", "model.vilt.encoder.layer.0.attention.attention.query.weight"):
        assert key in moved, key


@pytest.fixture(scope="module")
def fp32_first_losses(one_batch: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """Step 1 of the same run in fp32: the bf16 runs start from the same weights, so their first losses agree
    within bf16's precision and no more."""
    run_dir = train(tmp_path_factory.mktemp("fp32") / "run", one_batch, CONFIGS / "zero2_fp32.json", steps=1)
    return {tag: v[1] for tag, v in scalars(run_dir).items() if tag in TAGS[:3]}


def assert_ran_in_bf16(run_dir: Path, fp32: dict[str, float]) -> None:
    s = scalars(run_dir)
    for tag, value in fp32.items():
        assert s[tag][1] == pytest.approx(value, rel=2e-2), tag
    # The InfoNCE term alone is bit-for-bit the same in every fp32 run (the ViLT WordPiece vocabulary trained for
    # each run is not, which moves the VQA loss by ~1e-5): bf16 arithmetic moves it by ~1e-3.
    infonce = fp32["train/infonce_loss"]
    assert abs(s["train/infonce_loss"][1] - infonce) > 1e-4 * infonce, "no sign of bf16 arithmetic"


def test_shipped_bf16_json_on_one_rank_autocasts_trains_and_resumes(
    one_batch: Path, fp32_first_losses: dict[str, float], tmp_path: Path, no_launcher
) -> None:
    ds_json = CONFIGS / "zero2_bf16.json"
    run_dir = train(tmp_path / "run", one_batch, ds_json)
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 0 and not ds["bf16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert state(run_dir, f"global_step{STEPS}")["zero_stage"] == 0
    assert_ran_in_bf16(run_dir, fp32_first_losses)
    assert_trains(run_dir)
    assert_resumed_equal(run_dir, resume(run_dir, tmp_path / "resumed", ds_json))


@pytest.mark.parametrize("shipped,stage", [("zero2_bf16.json", 2), ("zero3_bf16.json", 3)])
def test_bf16_json_with_its_own_autocast_section_runs_zero_bf16_weights_trains_and_resumes(
    shipped: str,
    stage: int,
    one_batch: Path,
    fp32_first_losses: dict[str, float],
    tmp_path: Path,
    no_launcher,
) -> None:
    ds_json = kept_json(tmp_path, shipped)
    run_dir = train(tmp_path / "run", one_batch, ds_json)
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": False}
    assert state(run_dir, "global_step2")["zero_stage"] == stage
    assert list((run_dir / "checkpoints" / "global_step2").glob("*zero_pp_rank_0_*optim_states.pt"))
    assert_ran_in_bf16(run_dir, fp32_first_losses)
    assert_trains(run_dir)
    resumed = resume(run_dir, tmp_path / "resumed", ds_json)
    assert state(resumed, f"global_step{STEPS}")["zero_stage"] == stage
    assert_resumed_equal(run_dir, resumed)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_dropout_run_resumed_continues_the_saved_random_stream(
    loader: str, one_batch: Path, tmp_path: Path, no_launcher
) -> None:
    if loader == "dali":
        import nvidia.dali  # noqa: F401  (pinned in pyproject.toml: missing, the set-up is broken, not the test)
    ds_json = CONFIGS / "zero2_fp32.json"
    run_dir = train(
        tmp_path / "run", one_batch, ds_json, "--set", "model.dropout=0.2", "--set", f"data.loader={loader}"
    )
    assert json.loads((run_dir / "config.json").read_text())["model"]["dropout"] == 0.2
    assert_resumed_equal(run_dir, resume(run_dir, tmp_path / "resumed", ds_json))
