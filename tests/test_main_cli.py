"""The entry point's command line and its bad-input errors, in-process: each fails in seconds, before any
process group or DeepSpeed engine exists."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config.config import RunConfig
from trainer.main import REPO_ROOT, main


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_help_explains_every_option_and_config_field(capsys: pytest.CaptureFixture) -> None:
    rc, text = run(["--help"], capsys)
    assert rc == 0
    for option in (
        "--preset",
        "--train-data",
        "--val-data",
        "--run-dir",
        "--max-steps",
        "--resume",
        "--deepspeed_config",
        "--set",
        "--eval-only",
        "--local_rank",
        "--deepspeed ",
    ):
        assert option in text, option
    assert "latest|auto|TAG" in text and "accepted and ignored" in text
    cfg = RunConfig()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f"{section.name}.{f.name} (" in text, f"{section.name}.{f.name}"
    assert "The VQA head learns at lr * head_lr_mult" in text  # field docstrings are shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--bogus-option"], "unrecognized arguments: --bogus-option"),
        (["--set", "train.nope=1"], "unknown field 'train.nope'"),
        (["--set", "train.max_steps=many"], "'many' is not a valid int"),
        (["--train-data", "/nonexistent/shards"], "/nonexistent/shards: no such shard folder"),
        (["--eval-only", "--resume", "none"], "val_data: no shard folder given"),
        (
            ["--eval-only", "--run-dir", "/nonexistent/run"],
            "--resume none to score freshly initialised weights",
        ),
        (["--resume", "none"], "--resume none: only with --eval-only"),
        (["--run-dir", "/nonexistent/run", "--resume"], "has no config.json"),
    ],
)
def test_bad_input_is_a_plain_error(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    rc, text = run(argv, capsys)
    assert rc == 2
    assert message in text
    assert "Traceback" not in text


def test_data_and_deepspeed_json_are_checked_before_start_up(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = str(tiny_easyvqa_shards / "train")
    base = ["--train-data", train, "--run-dir", str(tmp_path / "run")]

    monkeypatch.setenv("WORLD_SIZE", "4")  # what a launcher of 4 ranks would announce
    rc, text = run(base, capsys)
    assert rc == 2 and "2 shard(s) for 4 ranks" in text
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, text = run([*base, "--set", "train.global_batch_size=24"], capsys)
    assert (
        rc == 2
        and "train.global_batch_size 24 is not a multiple of train.micro_batch_size 8 x world size 2" in text
    )
    monkeypatch.delenv("WORLD_SIZE")

    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2}')
    rc, text = run([*base, "--deepspeed_config", str(broken)], capsys)
    assert rc == 2 and "is not valid JSON" in text

    occupied = tmp_path / "occupied"
    (occupied / "checkpoints" / "global_step3").mkdir(parents=True)
    rc, text = run(["--train-data", train, "--run-dir", str(occupied)], capsys)
    assert rc == 2 and "already holds checkpoints" in text and "--resume" in text
    assert not (tmp_path / "run").exists()  # nothing was written by any of the failed starts


def test_runs_as_a_file_without_shadowing() -> None:
    # `deepspeed trainer/main.py` runs the file: the repository root, not trainer/, must be on sys.path.
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "trainer" / "main.py"), "--preset", "nope"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "unknown preset 'nope'" in out.stderr


def test_saved_config_round_trips_through_the_run_dir(tmp_path: Path) -> None:
    from trainer.config.config import config_from_dict
    from trainer.config.presets import get_preset

    cfg = get_preset("vqa2-base")
    cfg.save(tmp_path / "config.json")
    assert config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_deepspeed_flag_of_deepspeeds_examples_is_accepted_and_ignored(capsys: pytest.CaptureFixture) -> None:
    # `--deepspeed --deepspeed_config F`, as DeepSpeed's tutorials pass them: not "ambiguous option" any more.
    rc, text = run(["--deepspeed", "--preset", "nope"], capsys)
    assert rc == 2 and "unknown preset 'nope'" in text and "ambiguous" not in text
    from trainer.main import build_parser

    args = build_parser().parse_args(["--deepspeed", "--deepspeed_config", "ds.json"])
    assert args.deepspeed and args.deepspeed_config == "ds.json"


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_bar_in_a_log_file_updates_rarely() -> None:
    from common.progress import NON_TTY_BAR_INTERVAL_S, bar_refreshes, progress_bar

    log = _Stream(tty=False)
    bar = progress_bar(True, file=log, total=10_000, unit="step")
    assert bar.mininterval == bar.maxinterval == NON_TTY_BAR_INTERVAL_S >= 30 and not bar_refreshes(bar)
    for _ in range(10_000):
        bar.update(1)
        bar.set_postfix({"loss": "1.0"}, refresh=bar_refreshes(bar))
    bar.close()
    assert log.text.count("\r") <= 3, log.text  # the first draw, the last one, and the close

    terminal = _Stream(tty=True)
    bar = progress_bar(True, file=terminal, total=10)
    assert bar.mininterval < 1 and bar_refreshes(bar)
    bar.close()
    assert progress_bar(False, file=terminal, total=10).disable


def test_evaluation_shows_a_progress_bar_where_asked(capsys: pytest.CaptureFixture) -> None:
    import torch

    from trainer.run.evaluation import evaluate

    class Engine:
        def train(self, mode: bool = True) -> None:
            pass

        def forward(self, batch: dict) -> dict:
            return {"logits": torch.zeros(len(batch["question_id"]), 2)}

    batches = [
        {
            "question_id": torch.tensor([i]),
            "targets": torch.tensor([[1.0, 0.0]]),
            "valid": torch.tensor([True]),
        }
        for i in range(3)
    ]
    capsys.readouterr()
    for progress in (False, True):
        result = evaluate(
            Engine(), batches, answers=["a", "b"], device=torch.device("cpu"), progress=progress, total=3
        )
        assert result.count == 3 and result.vqa_score == 1.0
        err = capsys.readouterr().err
        assert ("eval:" in err and "/3 [" in err) == progress, err


def test_print_config_shows_the_resolved_configuration(capsys: pytest.CaptureFixture) -> None:
    from trainer.config.config import apply_overrides
    from trainer.config.presets import get_preset

    argv = [
        "--preset",
        "tiny",
        "--max-steps",
        "9",
        "--set",
        "optim.lr=3e-4",
        "--train-data",
        "/no/such/folder",
    ]
    assert main([*argv, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)  # nothing checked: the data folder need not exist yet
    want = apply_overrides(
        get_preset("tiny"), ["train.max_steps=9", "optim.lr=3e-4", "data.train_data=/no/such/folder"]
    )
    assert printed == json.loads(json.dumps(want.to_dict()))


def test_a_run_started_from_another_runs_config_resolves_to_the_same_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--config takes a run folder's config.json (written by RunFolder.save) and gives back the same configuration;
    --set still applies on top; a YAML file of the same schema, in part, fills in the rest from --preset."""
    from trainer.config.config import apply_overrides
    from trainer.config.presets import get_preset
    from trainer.run.run_folder import RunFolder

    cfg = apply_overrides(
        get_preset("tiny"), ["train.max_steps=11", "model.image_size=64", "loss.temperature=0.1"]
    )
    RunFolder(tmp_path / "first").save(cfg, answers=["yes", "no"])
    config_json = tmp_path / "first" / "config.json"
    assert main(["--config", str(config_json), "--preset", "demo", "--print-config"]) == 0
    assert capsys.readouterr().out == config_json.read_text()  # the saved file, byte for byte
    assert main(["--config", str(config_json), "--set", "train.max_steps=12", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["max_steps"] == 12

    (tmp_path / "part.yaml").write_text(
        "train:\n  max_steps: 5\n  progress_bar: false\noptim:\n  lr: 1.0e-3\n"
    )
    assert main(["--config", str(tmp_path / "part.yaml"), "--print-config"]) == 0
    want = apply_overrides(
        get_preset("tiny"), ["train.max_steps=5", "train.progress_bar=false", "optim.lr=1e-3"]
    )
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(want.to_dict()))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"trian": {}}', "unknown section 'trian'"),
        ('{"train": {"max_step": 3}}', "unknown field 'train.max_step'"),
        ('{"train": {"max_steps": "many"}}', "train.max_steps: 'many' is not a valid int"),
        ('{"train": {"max_steps": 2.5}}', "train.max_steps: '2.5' is not a valid int"),
        ('{"train": {"max_steps": 0}}', "train.max_steps must be >= 1"),
        ('{"train": ', "not valid JSON"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_field(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0], err


LOGGING_PROBE = """
import logging, warnings
from trainer.run.logs import setup_logging
setup_logging(0, None)
logging.getLogger().info("a library's info line on the root logger")
logging.getLogger("open_clip").info("a library's own logger")
logging.getLogger("DeepSpeed").info("a DeepSpeed configuration dump")
logging.getLogger("trainer.run.loop").info("the trainer's own line")
logging.getLogger().warning("a library's warning")
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
"""


@pytest.mark.parametrize("level", [None, "info"])
def test_other_libraries_info_lines_stay_below_warning_unless_asked(level: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VQA_LOG_LEVEL"}
    if level:
        env["VQA_LOG_LEVEL"] = level
    out = subprocess.run(
        [sys.executable, "-c", LOGGING_PROBE],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert "the trainer's own line" in err and "a library's warning" in err
    for line in (
        "a library's info line",
        "a library's own logger",
        "DeepSpeed configuration dump",
        "deprecated",
    ):
        assert (line in err) == (level == "info"), err


def test_log_level_option_and_a_cpu_only_machine_quiets_deepspeeds_accelerator_warning(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from trainer.run import logs

    assert main(["--log-level", "loud", "--print-config"]) == 2
    assert "--log-level: invalid choice: 'loud'" in capsys.readouterr().err
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(logs, "Path", lambda p: tmp_path / "no-driver")  # no /proc/driver/nvidia/gpus
    logs.quiet_cpu_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    logs.quiet_cpu_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cuda"  # what the user set stays
