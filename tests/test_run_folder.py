"""The run folder (trainer/run/run_folder.py): its files round-trip, are written atomically, and a damaged one is a
one-line error naming it. Tiny sizes, CPU, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config.config import ConfigError, apply_overrides
from trainer.config.presets import get_preset
from trainer.run import run_folder
from trainer.run.run_folder import ANSWERS_FILE, CONFIG_FILE, DS_CONFIG_FILE, TOKENIZER_DIR, RunFolder

QUESTIONS = ["what shape is in the image?", "what color is the shape?", "is there a circle?"] * 4


def saved_folder(path: Path) -> tuple[RunFolder, object, list[str]]:
    cfg = apply_overrides(get_preset("tiny"), ["model.clip_text_vocab=compact"])
    answers = ["circle", "red", "yes", "no"]
    folder = RunFolder(path)
    folder.save(cfg, answers=answers, ds_config={"zero_optimization": {"stage": 2}})
    run_folder.build_tokenizer(cfg.model, folder.tokenizer_dir, lambda: QUESTIONS, fit_clip_vocab=True)
    return folder, cfg, answers


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    folder, cfg, answers = saved_folder(tmp_path / "run")
    assert sorted(p.name for p in folder.path.iterdir()) == sorted(
        [CONFIG_FILE, DS_CONFIG_FILE, ANSWERS_FILE, TOKENIZER_DIR]
    )
    assert json.loads((folder.path / DS_CONFIG_FILE).read_text()) == {"zero_optimization": {"stage": 2}}
    loaded = run_folder.load(folder.path, seed=0)
    assert loaded.config == cfg and loaded.answers == answers
    assert loaded.tokenizer.clip_vocab and folder.has_tokenizer()
    assert loaded.task.model.clip.token_embedding.num_embeddings == len(loaded.tokenizer.clip_vocab) + 1
    again = run_folder.load(folder.path, seed=0)
    for (name, a), b in zip(loaded.task.state_dict().items(), again.task.state_dict().values(), strict=True):
        assert a.equal(b), name  # one seed, one initialisation

    # Trained weights load strictly into a task built without pretrained sources, in eval mode.
    trained = run_folder.load(folder, state_dict=loaded.task.state_dict())
    assert not trained.task.training
    with pytest.raises(RuntimeError):
        run_folder.load(
            folder, state_dict={"nope": loaded.task.state_dict()[next(iter(loaded.task.state_dict()))]}
        )


def test_writes_are_atomic_and_leave_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, cfg, answers = saved_folder(tmp_path / "run")
    folder.save(cfg, answers=answers)  # rewriting a folder
    names = [p.name for p in folder.path.rglob("*")]
    assert not [n for n in names if ".tmp" in n], names

    import os

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    before = (folder.path / CONFIG_FILE).read_text()
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        folder.save(apply_overrides(cfg, ["train.max_steps=7"]), answers=answers)
    monkeypatch.undo()
    assert (folder.path / CONFIG_FILE).read_text() == before  # the old file, whole
    assert not [p.name for p in folder.path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"model": {"variant": ', "not valid JSON"),
        ("[1, 2]", "not a saved run configuration"),
        ('{"model": {"nope": 1}}', "unknown field 'model.nope'"),
        ('{"model": 3}', CONFIG_FILE),
    ],
)
def test_a_damaged_config_is_one_line_naming_the_file(tmp_path: Path, content: str, reason: str) -> None:
    folder, _, _ = saved_folder(tmp_path / "run")
    folder.config_file.write_text(content)
    with pytest.raises(ConfigError) as info:
        folder.read_config()
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(folder.config_file) in message and reason in message
    folder.answers_file.write_text("[")
    with pytest.raises(ConfigError, match=f"{ANSWERS_FILE}: not valid JSON"):
        folder.read_answers()


def test_answers_of_a_resumed_run_must_not_change(tmp_path: Path) -> None:
    folder, _, answers = saved_folder(tmp_path / "run")
    folder.check_answers(answers, "data/train")
    with pytest.raises(ConfigError, match=r"data/train: its answer vocabulary differs .*answers.json"):
        folder.check_answers([*answers, "blue"], "data/train")


def test_a_fresh_run_needs_a_tokenizer_source_and_an_empty_checkpoint_folder(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no question tokenizer in"):
        folder.check_tokenizer_source(get_preset("tiny"))
    (folder.path / "checkpoints" / "global_step3").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        folder.check_fresh()
