"""The run folder: what a training run leaves behind for the commands that come after it, and the one way back
from it to a model.

    RUN/
      config.json             the resolved RunConfig (trainer/config/config.py) rank 0, every training start
      deepspeed_config.json   the resolved DeepSpeed JSON of that start         rank 0, every training start
      answers.json            the answer list (index -> answer string)          rank 0, every training start
      tokenizer/              the question tokenizer (data_pipeline/text.py)    this module, rank 0, once per run
      checkpoints/            DeepSpeed checkpoints and the trainer's state     trainer/checkpoint/checkpointing.py
      eval/                   predictions and metrics of each evaluation        trainer/run/evaluation.py
      eval/<tag>/             an --eval-only of checkpoint <tag> (or initial)   trainer/run/run.py, as a folder of its own
      events.out.tfevents.*   TensorBoard events (the run is named after RUN)   trainer/run/metrics.py
      .lock                   the job that holds the folder                     trainer/run/runlock.py

Only the training run that holds the folder's lock writes its files: a fresh run through `RunFolder.start` (writes the
three JSON files, provisions the tokenizer), a resumed one through `prepare_resume` and, once its checkpoint has
loaded, `record`, so that a start that cannot resume changes nothing. `--eval-only` writes a folder of the same shape
under eval/<tag>/ (`start_evaluation`) and only reads the run's own. Every command builds its task with `load`;
export, predict, bench and the preset search read or rebuild through the same names.
The answer list and the tokenizer travel with the run, so that predict and export never need the data folder.
Every JSON file is written atomically (temp file, then rename): a reader (an evaluation beside the training job, a
crash mid-write) sees the old file or the new one, never half of one, and a symbolic link in a file's place is
replaced rather than written through. Damaged files are one-line `ConfigError`s that name the file.

The question tokenizer comes from, in order: the run folder (a resumed or evaluated run keeps its own), a pretrained
ViLT checkpoint (`model.vilt_pretrained`, its own WordPiece vocabulary), or the training questions (a WordPiece
vocabulary trained on them). With `model.clip_text_vocab=compact` it also records the CLIP BPE ids the training
questions use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from common import atomic
from data_pipeline.shards.sharding import iter_sample_json, open_folder, read_answers
from trainer.checkpoint.layout import list_complete
from trainer.config.config import ConfigError, ModelConfig, RunConfig, config_from_dict
from trainer.engine import dist as D

if TYPE_CHECKING:
    import torch

    from data_pipeline.text import QuestionTokenizer

CONFIG_FILE = "config.json"
DS_CONFIG_FILE = "deepspeed_config.json"
ANSWERS_FILE = "answers.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_META = (
    "question_tokenizer.json"  # what QuestionTokenizer.save writes last: marks a complete tokenizer/
)


class Loaded(NamedTuple):
    """What every command builds from a run folder."""

    config: RunConfig
    tokenizer: QuestionTokenizer
    answers: list[str]
    task: torch.nn.Module


def write_json(path: Path, obj: Any, *, indent: int | None = None) -> None:
    """The one writer of the folder's JSON files: atomic (common/atomic.py), so that a reader never sees a
    torn file."""
    atomic.write_text(path, json.dumps(obj, indent=indent) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (not a run folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None


class RunFolder:
    """One run folder: its file names, its reads and writes, its tokenizer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.ds_config_file = self.path / DS_CONFIG_FILE
        self.answers_file = self.path / ANSWERS_FILE
        self.tokenizer_dir = self.path / TOKENIZER_DIR

    # -- reading -------------------------------------------------------------------------------------------------
    def read_config(self) -> RunConfig:
        data = _read_json(self.config_file)
        if not isinstance(data, dict):
            raise ConfigError(f"{self.config_file}: not a saved run configuration (a JSON object)")
        try:
            return config_from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.config_file}: {str(exc).splitlines()[0]}") from None

    def read_answers(self) -> list[str]:
        answers = _read_json(self.answers_file)
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ConfigError(f"{self.answers_file}: must be a non-empty JSON list of answer strings")
        return answers

    def has_tokenizer(self) -> bool:
        return (self.tokenizer_dir / TOKENIZER_META).is_file()

    def load_tokenizer(self) -> QuestionTokenizer:
        # data_pipeline.text (transformers, open_clip) and trainer.modeling.task (the model) are imported where used, here and
        # below: trainer/main.py imports this module, and its --help need not wait seconds for them.
        from data_pipeline.text import QuestionTokenizer

        return QuestionTokenizer.load(self.tokenizer_dir)

    def tokenizer_files(self) -> dict[str, str]:
        """The tokenizer's files by name (what an exported weights file carries)."""
        return {p.name: p.read_text() for p in sorted(self.tokenizer_dir.iterdir()) if p.is_file()}

    # -- writing -------------------------------------------------------------------------------------------------
    def save(
        self,
        cfg: RunConfig,
        *,
        answers: list[str],
        ds_config: dict[str, Any] | None = None,
        tokenizer_files: dict[str, str] | None = None,
    ) -> None:
        """Write the folder's files (each atomically); the tokenizer from its files, when given."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_file, cfg.to_dict(), indent=2)
        if ds_config is not None:
            write_json(self.ds_config_file, ds_config, indent=2)
        write_json(self.answers_file, answers)
        if tokenizer_files is not None:
            self.tokenizer_dir.mkdir(exist_ok=True)
            for name, text in tokenizer_files.items():
                atomic.write_text(self.tokenizer_dir / name, text)

    # -- starting a run ------------------------------------------------------------------------------------------
    def check_tokenizer_source(self, cfg: RunConfig) -> None:
        """Fail before start-up when there is no tokenizer here and nothing to build one from."""
        if self.has_tokenizer() or cfg.model.vilt_pretrained or cfg.data.train_data:
            return
        raise ConfigError(
            f"no question tokenizer in {self.tokenizer_dir} and nothing to build one from: "
            f"give --train-data (or model.vilt_pretrained), or --run-dir of a trained run"
        )

    def check_fresh(self) -> None:
        """A fresh run never writes into a folder that holds checkpoints (it would overwrite them)."""
        ckpts = self.path / "checkpoints"
        if ckpts.is_dir() and any(ckpts.iterdir()):
            found = ", ".join(r.tag for r in list_complete(ckpts)) or "incomplete ones"
            raise ConfigError(
                f"--run-dir {self.path} already holds checkpoints ({found}): pass --resume to continue that run, "
                f"or choose another --run-dir"
            )

    def check_answers(self, answers: list[str], data_dir: str) -> None:
        """A resumed run keeps the answer vocabulary it was trained with."""
        if self.answers_file.is_file() and self.read_answers() != answers:
            raise ConfigError(
                f"{data_dir}: its answer vocabulary differs from the one {self.path} was trained with "
                f"({ANSWERS_FILE})"
            )

    def start(self, cfg: RunConfig, ds_config: dict[str, Any], answers: list[str], dist: D.DistInfo) -> None:
        """A fresh run: rank 0 writes config, DeepSpeed config and answers and provisions the tokenizer; every rank
        waits."""
        if dist.is_main:
            self.save(cfg, answers=answers, ds_config=ds_config)
            self.provision_tokenizer(cfg)
        D.barrier()

    def prepare_resume(self, cfg: RunConfig, dist: D.DistInfo) -> None:
        """A resumed run, before its checkpoint is loaded: only what building its task needs (the tokenizer's CLIP
        ids, where `compact` asks for them and an older tokenizer lacks them); config and DeepSpeed config are
        rewritten by `record` once the checkpoint has loaded, so that a start that cannot resume changes nothing."""
        if dist.is_main:
            self.provision_tokenizer(cfg)
        D.barrier()

    def record(self, cfg: RunConfig, ds_config: dict[str, Any], answers: list[str], dist: D.DistInfo) -> None:
        """A resumed run, once its checkpoint has loaded: rank 0 writes the settings it continues with."""
        if dist.is_main:
            self.save(cfg, answers=answers, ds_config=ds_config)
        D.barrier()

    def start_evaluation(
        self, cfg: RunConfig, ds_config: dict[str, Any], answers: list[str], run: RunFolder, dist: D.DistInfo
    ) -> None:
        """An `--eval-only` folder (RUN/eval/<checkpoint tag>): rank 0 records the settings it evaluates with and
        the answers, and takes the run's tokenizer (or, for initial weights in a folder without one, builds it
        here); the run's own files are only read."""
        if dist.is_main:
            tokenizer = run.tokenizer_files() if run.has_tokenizer() else None
            self.save(cfg, answers=answers, ds_config=ds_config, tokenizer_files=tokenizer)
            self.provision_tokenizer(cfg)
        D.barrier()

    def write_problem(self) -> str | None:
        """Why a training run could not write its checkpoints here (None: it can): `checkpoints/` a symbolic link
        to nothing, or not a folder, or the folder it would be written in not writable (a read-only mount, missing
        permissions). Found by writing and removing a probe file, as a save would, before anything is written."""
        ckpts = self.path / "checkpoints"
        if ckpts.is_symlink() and not ckpts.exists():
            return f"{ckpts} is a symbolic link to {os.readlink(ckpts)}, which does not exist"
        if ckpts.exists() and not ckpts.is_dir():
            return f"{ckpts} is not a folder"
        where = next((p for p in (ckpts, self.path, *self.path.parents) if p.exists()), Path("."))
        if not where.is_dir():
            return f"{where} is not a folder"
        probe = where / f".write-probe-{uuid.uuid4().hex}"  # every rank of every node probes at once
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            return f"cannot write in {where} ({exc.strerror or exc})"
        return None

    def provision_tokenizer(self, cfg: RunConfig) -> None:
        """The run's tokenizer in tokenizer/: kept when there, else from a pretrained ViLT or the training questions.
        A tokenizer left by an earlier run without the CLIP ids that `compact` needs gets them (its ViLT side is kept)."""
        from data_pipeline.text import CLIP_VOCAB_FILE

        m = cfg.model
        compact = m.compact_clip_vocab

        def questions() -> Iterator[str]:
            assert cfg.data.train_data, "check_tokenizer_source ran before start-up"
            return shard_questions(cfg.data.train_data)

        if not self.has_tokenizer():
            build_tokenizer(m, self.tokenizer_dir, questions, fit_clip_vocab=compact)
        elif compact and not (self.tokenizer_dir / CLIP_VOCAB_FILE).is_file():
            tok = self.load_tokenizer()
            tok.fit_clip_vocab(questions())
            tok.save(self.tokenizer_dir)


# -- the one way from a run folder to a task ---------------------------------------------------------------------
def load(
    folder: str | Path | RunFolder,
    *,
    config: RunConfig | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    seed: int | None = None,
) -> Loaded:
    """(config, tokenizer, answers, task) of a run folder. `config` replaces the saved one (a run that has just
    written it passes its own); `state_dict`: trained weights, loaded strictly into a task built without the
    pretrained sources (inference needs neither the hub nor the original files), in eval mode; `seed` seeds torch
    before the task's random initialisation (the same weights on every rank)."""
    folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    cfg = config if config is not None else folder.read_config()
    answers = folder.read_answers()
    tokenizer = folder.load_tokenizer()
    sizes = {
        "n_answers": len(answers),
        "vilt_vocab_size": tokenizer.vilt_vocab_size,
        "clip_vocab": tokenizer.clip_vocab,
    }
    if state_dict is not None:
        return Loaded(cfg, tokenizer, answers, _trained_task(cfg, state_dict, sizes))
    from trainer.modeling.task import build_task

    if seed is not None:
        torch.manual_seed(seed)
    return Loaded(cfg, tokenizer, answers, build_task(cfg, **sizes))


def _trained_task(
    cfg: RunConfig, state_dict: dict[str, torch.Tensor], sizes: dict[str, Any]
) -> torch.nn.Module:
    from trainer.modeling.task import build_task

    model = dataclasses.replace(cfg.model, vilt_pretrained=None, clip_pretrained=None)
    task = build_task(dataclasses.replace(cfg, model=model), **sizes)
    try:
        task.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        if model == cfg.model:
            raise
        # A pretrained checkpoint's architecture can differ from the named size: build it from its own source.
        task = build_task(cfg, **sizes)
        task.load_state_dict(state_dict, strict=True)
    return task.eval()


# -- tokenizer and answers from the data -------------------------------------------------------------------------
def build_tokenizer(
    model: ModelConfig, out_dir: Path, questions: Callable[[], Iterable[str]], *, fit_clip_vocab: bool
) -> QuestionTokenizer:
    """A new question tokenizer saved in `out_dir`: ViLT's own with `model.vilt_pretrained`, else a WordPiece
    vocabulary trained on `questions()`; with `fit_clip_vocab`, the CLIP BPE ids the questions use."""
    from data_pipeline.text import QuestionTokenizer

    sizes = {
        "clip_arch": model.clip_arch,
        "max_text_len": model.max_text_len,
        "clip_context_length": model.clip_context_length,
    }
    if model.vilt_pretrained:
        tok = QuestionTokenizer.from_pretrained_vilt(model.vilt_pretrained, **sizes)
        if fit_clip_vocab:
            tok.fit_clip_vocab(questions())
        tok.save(out_dir)
        return tok
    return QuestionTokenizer.build(
        questions(), out_dir, vocab_size=model.wordpiece_vocab_size, fit_clip_vocab=fit_clip_vocab, **sizes
    )


def shard_questions(folder: str) -> Iterator[str]:
    """The question texts of a shard folder, in shard order."""
    return (s["question"] for s in iter_sample_json(open_folder(folder)))


def data_answers(cfg: RunConfig) -> list[str]:
    """The answer list of the run's data; training and evaluation data must share it."""
    data_dir = cfg.data.train_data or cfg.data.val_data
    assert data_dir, "check_data ran before start-up"
    answers = read_answers(data_dir)
    if cfg.data.val_data and read_answers(cfg.data.val_data) != answers:
        raise ConfigError(
            f"{cfg.data.val_data} and {data_dir} have different answer vocabularies ({ANSWERS_FILE})"
        )
    return answers
