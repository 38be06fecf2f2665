"""End to end through the real entry point: DeepSpeed on CPU (gloo), 2 ranks, the tiny preset, real easy-VQA shards.

Launches are few and short (each costs ~20-40 s of start-up on 2 cores), and each serves several checks:
- ZeRO-2 (`deepspeed --num_gpus 2`): trains, logs every TensorBoard tag, checkpoints at steps 2 and 4, evaluates;
  resuming a copy from step 2 reproduces the uninterrupted losses; its step-4 checkpoint, converted to a universal
  one, resumes on 1 rank, whose evaluation of the loaded weights gives the 2-rank VQA score.
- ZeRO-3: SIGTERM mid-run leaves a complete checkpoint, which exports to an fp32 export folder (safetensors) that
  loads and answers questions as the run folder does.
- ZeRO-1 (`torchrun --nproc_per_node 2`): a few steps train.
- One fp32 rank, in this process: runs at ZeRO stage 0 (no shards); its checkpoint exports (the export folder)
  and predicts, and `to-universal` and a resume on 2 ranks refuse it, saying why.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.launch_env import running_in_group, wait_for_output, wait_group
from trainer.checkpoint.layout import COMPLETE, list_complete
from trainer.checkpoint.universal import to_universal
from trainer.main import REPO_ROOT
from trainer.run.metrics import GPU_TAGS, TRAIN_TAGS, VAL_TAGS

# Each launch has its own deadline (300 s); a test with a 2-rank fixture launch and its own may take two.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
TINY = [
    "--preset",
    "tiny",
    "--set",
    "train.global_batch_size=8",
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.progress_bar=false",
    "--set",
    "data.num_workers=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(args: list[str], ranks: int, launcher: str = "deepspeed") -> list[str]:
    if ranks == 1:
        return [sys.executable, "trainer/main.py", *args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(_free_port()),
                "trainer/main.py", *args]  # fmt: skip
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(_free_port()),
            "trainer/main.py", *args]  # fmt: skip


def env(ranks: int) -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e["OMP_NUM_THREADS"] = "1" if ranks > 1 else "2"  # 2 ranks on 2 cores: no oversubscription
    return e


def launch(args: list[str], ranks: int = 2, launcher: str = "deepspeed", timeout: int = 300) -> str:
    out = subprocess.run(
        command(args, ranks, launcher),
        cwd=REPO_ROOT,
        env=env(ranks),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    return log


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("events.out.tfevents.*"))
    shutil.rmtree(dst / "eval", ignore_errors=True)
    return dst


@pytest.fixture(scope="module")
def zero2_run(tiny_easyvqa_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    args = [
        *TINY,
        "--train-data",
        str(tiny_easyvqa_shards / "train"),
        "--val-data",
        str(tiny_easyvqa_shards / "test"),
    ]
    args += ["--run-dir", str(run_dir), "--max-steps", "4", "--set", "train.ckpt_every=2"]
    # The demo's compact CLIP token table, through checkpoints, resume and the universal conversion.
    args += ["--set", "model.clip_text_vocab=compact"]
    args += ["--deepspeed_config", "deepspeed_configs/zero2_fp32.json"]
    launch(args)
    return run_dir


@pytest.mark.distributed
def test_zero2_trains_logs_checkpoints_and_evaluates(zero2_run: Path) -> None:
    s = scalars(zero2_run)
    for tag in (*TRAIN_TAGS, *VAL_TAGS):
        assert tag in s, tag
    assert not set(GPU_TAGS) & set(s)  # a CPU run
    assert sorted(s["train/loss"]) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in s["train/loss"].values())
    assert s["train/loss"][4] < s["train/loss"][1]
    assert 0.0 <= s["val/vqa_score"][4] <= 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(zero2_run))
    ea.Reload()
    assert ea.PluginTagToContent("hparams")  # hyperparameters recorded

    refs = list_complete(zero2_run / "checkpoints")
    assert [(r.tag, r.world_size) for r in refs] == [("global_step2", 2), ("global_step4", 2)]
    state = json.loads((zero2_run / "checkpoints" / "global_step4" / "trainer_state.json").read_text())
    assert (state["step"], state["samples"], state["epoch"], state["batch_in_epoch"]) == (4, 32, 0, 4)
    # The loop's state is stored once: DeepSpeed's own files carry no copy of it.
    model_states = torch.load(
        zero2_run / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert "module" in model_states and "trainer" not in model_states
    assert (zero2_run / "checkpoints" / "latest").read_text() == "global_step4"
    config = json.loads((zero2_run / "config.json").read_text())
    assert config["model"]["variant"] == "clip-infonce-dot" and config["train"]["max_steps"] == 4
    assert config["model"]["clip_text_vocab"] == "compact"
    clip_vocab = json.loads((zero2_run / "tokenizer" / "clip_vocab.json").read_text())
    assert 0 in clip_vocab and 49407 in clip_vocab and len(clip_vocab) < 200
    ds = json.loads((zero2_run / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 1

    preds = json.loads((zero2_run / "eval" / "val_predictions_step00000004.json").read_text())
    answers = json.loads((zero2_run / "answers.json").read_text())
    assert len(preds) == 32 and len({p["question_id"] for p in preds}) == 32
    assert all(set(p) == {"question_id", "answer"} and p["answer"] in answers for p in preds)


@pytest.mark.distributed
def test_resume_reproduces_the_uninterrupted_losses(zero2_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(zero2_run, tmp_path / "resumed")
    shutil.rmtree(run_dir / "checkpoints" / "global_step4")
    launch(["--run-dir", str(run_dir), "--resume", "global_step2"])
    full, resumed = scalars(zero2_run), scalars(run_dir)
    assert sorted(resumed["train/loss"]) == [3, 4]
    for tag in ("train/loss", "train/vqa_loss", "train/infonce_loss", "train/grad_norm", "train/lr"):
        for step in (3, 4):
            assert resumed[tag][step] == pytest.approx(full[tag][step], rel=1e-6, abs=1e-7), (tag, step)
    assert resumed["val/vqa_score"][4] == full["val/vqa_score"][4]


@pytest.mark.distributed
def test_two_rank_checkpoint_resumes_on_one_rank_via_universal(zero2_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(zero2_run, tmp_path / "universal")
    dst = to_universal(run_dir, "global_step4")
    assert (dst / COMPLETE).is_file() and (dst / "zero").is_dir()
    # eval_at_start evaluates the loaded weights on 1 rank before training on: the 2-rank score must come back.
    log = launch(
        ["--run-dir", str(run_dir), "--resume", "global_step4_universal", "--max-steps", "5"]
        + ["--set", "train.eval_at_start=true"],
        ranks=1,
    )
    assert "world size 2 -> 1" in log
    one, two = scalars(run_dir), scalars(zero2_run)
    assert one["val/vqa_score"][4] == pytest.approx(two["val/vqa_score"][4], abs=1e-9)
    assert one["val/loss"][4] == pytest.approx(two["val/loss"][4], rel=1e-5)
    assert sorted(one["train/loss"]) == [5] and math.isfinite(one["train/loss"][5])
    assert [r.world_size for r in list_complete(run_dir / "checkpoints") if r.tag == "global_step5"] == [1]

    # --eval-only, in this process (a single rank needs no launcher): the step-5 weights score as at the end of the run.
    from trainer.main import main

    final = json.loads((run_dir / "eval" / "val_metrics_step00000005.json").read_text())
    shutil.rmtree(run_dir / "eval")
    assert (
        main(["--run-dir", str(run_dir), "--resume", "--eval-only", "--set", "train.progress_bar=false"]) == 0
    )
    again = json.loads((run_dir / "eval" / "global_step5" / "val_metrics_step00000005.json").read_text())
    assert again["vqa_score"] == final["vqa_score"] and again["count"] == 32
    predictions = run_dir / "eval" / "global_step5" / "val_predictions_step00000005.json"
    assert len(json.loads(predictions.read_text())) == 32
    assert sorted(r.tag for r in list_complete(run_dir / "checkpoints")) == [
        "global_step4",
        "global_step4_universal",
        "global_step5",
    ]  # evaluation wrote no checkpoint


@pytest.mark.distributed
def test_sigterm_mid_run_leaves_a_checkpoint_that_exports_and_predicts(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "zero3"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    args += ["--max-steps", "1000", "--deepspeed_config", "deepspeed_configs/zero3_fp32.json"]
    # Evaluating first also runs ZeRO-3's gathered-parameter forward in evaluation mode on both ranks.
    args += ["--val-data", str(tiny_easyvqa_shards / "test"), "--set", "train.eval_at_start=true"]
    args += ["--set", "model.clip_text_vocab=compact"]  # export and predict rebuild the compact table
    log = tmp_path / "zero3.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command(args, 2),
            cwd=REPO_ROOT,
            env=env(2),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the signal reaches launcher and ranks, as on preemption
        )
    try:
        wait_for_output(proc, log, "step 2/1000", timeout_s=300)
        os.killpg(proc.pid, signal.SIGTERM)
        wait_group(proc, timeout_s=120)  # the checkpoint, then the exit of every rank (and of the launcher)
    finally:
        if running_in_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert "received SIGTERM" in text, text[-5000:]
    refs = list_complete(run_dir / "checkpoints")
    assert refs and refs[-1].step >= 2 and refs[-1].world_size == 2, text[-5000:]
    state = json.loads((run_dir / "checkpoints" / refs[-1].tag / "trainer_state.json").read_text())
    assert state["zero_stage"] == 3
    assert 0.0 <= scalars(run_dir)["val/vqa_score"][0] <= 1.0

    from trainer.serve import export, predict

    out = tmp_path / "model"  # an export folder; zero_to_fp32's weights are views into one buffer each
    assert export.main(["--run-dir", str(run_dir), "--out", str(out)]) == 0
    task, tokenizer, answers, cfg = export.from_pretrained(out)  # strict load of every fp32 weight
    assert cfg.model.variant == "clip-infonce-dot" and len(answers) == 13
    assert (
        tokenizer.clip_vocab
        and task.model.clip.token_embedding.num_embeddings == len(tokenizer.clip_vocab) + 1
    )
    capsys.readouterr()

    import easy_vqa

    image = str(next(iter(easy_vqa.get_test_image_paths().values())))
    q = ["what shape is in the image?", "what color is the shape?"]
    assert (
        predict.main(["--weights", str(out), "--image", image, "--question", q[0], "--question", q[1]]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["question"] for r in rows] == q and all(r["answer"] in answers for r in rows)
    assert (
        predict.main(["--run-dir", str(run_dir), "--image", image, "--question", q[0], "--question", q[1]])
        == 0
    )
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


@pytest.mark.distributed
def test_zero1_trains_under_torchrun(tiny_easyvqa_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "zero1"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    args += ["--max-steps", "2", "--deepspeed_config", "deepspeed_configs/zero1_fp32.json"]
    launch(args, launcher="torchrun")
    s = scalars(run_dir)
    assert sorted(s["train/loss"]) == [1, 2] and all(math.isfinite(v) for v in s["train/loss"].values())
    assert [r.tag for r in list_complete(run_dir / "checkpoints")] == ["global_step2"]


@pytest.fixture(scope="module")
def stage0_run(tiny_easyvqa_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fp32 rank in this process (seconds): trainer/engine/engine.py runs it at ZeRO stage 0."""
    from trainer.main import main

    run_dir = tmp_path_factory.mktemp("stage0") / "run"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    args += ["--max-steps", "2", "--set", "train.ckpt_every=2", "--set", "model.clip_text_vocab=compact"]
    args += ["--deepspeed_config", "deepspeed_configs/zero2_fp32.json"]
    assert main(args) == 0
    return run_dir


def test_one_rank_stage0_checkpoint_exports_and_predicts(stage0_run: Path, tmp_path: Path, capsys) -> None:
    import easy_vqa
    import torch

    from trainer.serve import export, predict

    ckpt = stage0_run / "checkpoints" / "global_step2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["zero_stage"] == 0
    assert not list(ckpt.glob("*optim_states.pt"))  # no ZeRO shards for zero_to_fp32 to gather

    from safetensors.torch import load_file

    out = tmp_path / "model"
    assert export.main(["--run-dir", str(stage0_run), "--out", str(out)]) == 0
    task, tokenizer, answers, cfg = export.from_pretrained(out)  # strict load of every weight
    assert cfg.model.variant == "clip-infonce-dot" and len(answers) == 13
    # The trained weights, in fp32: the module entry DeepSpeed saved.
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    exported = load_file(out / export.WEIGHTS_FILE)
    assert exported.keys() == module.keys() == task.state_dict().keys()
    for name, value in module.items():
        assert exported[name].dtype == (torch.float32 if value.is_floating_point() else value.dtype), name
        assert torch.equal(exported[name], value), name

    image = str(next(iter(easy_vqa.get_test_image_paths().values())))
    question = "what shape is in the image?"
    capsys.readouterr()
    assert predict.main(["--weights", str(out), "--image", image, "--question", question]) == 0
    from_file = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert predict.main(["--run-dir", str(stage0_run), "--image", image, "--question", question]) == 0
    from_run = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(from_run) == 1 and from_run[0]["answer"] in answers
    assert from_run == from_file


def test_one_rank_stage0_checkpoint_needs_and_gets_no_universal_conversion(stage0_run: Path, capsys) -> None:
    from trainer.checkpoint import layout, universal

    capsys.readouterr()
    assert universal.main(["to-universal", "--run-dir", str(stage0_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert (
        err.startswith("error: checkpoint global_step2 (written by 1 rank) was written at ZeRO stage 0")
        and "no conversion" in err
    )
    assert "--resume global_step2" in err
    assert not (stage0_run / "checkpoints" / "global_step2_universal").exists()
    # Nothing sharded: it resumes as it is on another number of ranks (tests/test_main_default_ranks.py runs it).
    assert layout.resolve_resume(stage0_run / "checkpoints", "latest", 2).tag == "global_step2"


def test_resume_auto_starts_fresh_then_continues(
    tiny_easyvqa_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One command for the first start and every restart (a requeued Slurm job, a restarted Kubernetes pod)."""
    import logging

    from trainer.main import main

    run_dir = tmp_path / "run"
    base = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    base += ["--deepspeed_config", "deepspeed_configs/zero2_fp32.json", "--resume", "auto"]
    # A save cut off before the first checkpoint was complete: nothing to resume; the fresh run sets it aside, and
    # its own first save's pruning removes it.
    (run_dir / "checkpoints" / "global_step2").mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="trainer")
    assert main([*base, "--max-steps", "2"]) == 0
    assert "--resume auto: no complete checkpoint" in caplog.text and "starting a fresh run" in caplog.text
    assert sorted(scalars(run_dir)["train/loss"]) == [1, 2]  # trained from step 0
    assert [(r.tag, r.step) for r in list_complete(run_dir / "checkpoints")] == [("global_step2", 2)]

    caplog.clear()
    assert main([*base, "--max-steps", "4"]) == 0
    assert "--resume auto: resuming" in caplog.text and "(step 2)" in caplog.text
    assert "resumed from" in caplog.text
    losses = scalars(run_dir)["train/loss"]
    assert sorted(losses) == [1, 2, 3, 4]
    assert "step 3/4" in caplog.text and "step 1/4" not in caplog.text  # continued from step 2, not from 0
    state = json.loads((run_dir / "checkpoints" / "global_step4" / "trainer_state.json").read_text())
    assert (state["step"], state["samples"]) == (4, 32)
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 4
