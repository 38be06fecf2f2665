"""Entry point: parse, initialise the process group, build the run, train (or evaluate), close.

    deepspeed --num_gpus 8 trainer/main.py --preset vqa2-base --train-data D/train --val-data D/val --run-dir R
    deepspeed --hostfile H trainer/main.py ...        torchrun --nproc_per_node N trainer/main.py ...
    python trainer/main.py --preset tiny ...           (a plain single process, CPU or GPU)

`main(argv) -> int` is also called in-process by tests. Exit status: 0 done, 2 bad input (configuration, data,
checkpoint), 1 a failure while training (e.g. a non-finite loss), 128 + signal after a SIGTERM/SIGINT checkpoint.
A disk too full for the next checkpoint is a failure while training (exit 1, one line naming the folder, the free and
the needed space): the input was fine and the same command succeeds once there is room; the earlier checkpoints are
left intact (trainer/checkpointing.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads OpenMP. Several ranks on one host's CPU: idle OpenMP threads sleep instead of spinning, or
# each rank's spinning threads take the cores the others need (tiny preset, 2 ranks on 2 cores: 2-8 samples/s
# spinning, 24-38 passive). One rank: OpenMP's default (spin a while, then sleep) keeps the cores warm between
# the many small ops of a tiny model (demo preset on 2 cores: 164-177 samples/s vs 124 passive). The environment
# variable, when set, decides. Ranks on this host: torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE.
_LOCAL_RANKS = (
    os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1")
)
if int(_LOCAL_RANKS) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and not __package__:
    # Run as a file (the deepspeed/torchrun convention): import the project as packages from the repository root,
    # and drop trainer/ itself from the path so that none of its modules can shadow a package of the same name.
    sys.path[0] = str(REPO_ROOT)

import argparse  # noqa: E402
import ast  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import typing  # noqa: E402
from typing import Any  # noqa: E402

from trainer import dist as D  # noqa: E402
from trainer.config import ConfigError, RunConfig, apply_overrides, config_from_dict  # noqa: E402
from trainer.presets import PRESETS, get_preset  # noqa: E402

log = logging.getLogger("trainer.main")

CONFIG_FILE = "config.json"
DS_CONFIG_FILE = "deepspeed_config.json"
ANSWERS_FILE = "answers.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_META = "question_tokenizer.json"  # what QuestionTokenizer.save writes beside the vocabulary


# -- command line ------------------------------------------------------------------------------------------------
def _field_docs() -> dict[str, str]:
    """`section.field` -> the docstring under it in trainer/config.py (for --help)."""
    import trainer.config as config_module

    tree = ast.parse(Path(config_module.__file__).read_text())
    sections = {
        f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in dataclasses.fields(RunConfig)
    }
    docs: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in sections):
            continue
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                nxt = body[i + 1] if i + 1 < len(body) else None
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[f"{sections[node.name]}.{stmt.target.id}"] = " ".join(str(nxt.value.value).split())
    return docs


def _fields_epilog() -> str:
    docs = _field_docs()
    lines = ["configuration fields for --set (defaults of the dataclasses; presets change some):"]
    default = RunConfig()
    for section in dataclasses.fields(RunConfig):
        obj = getattr(default, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            key = f"{section.name}.{f.name}"
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"  {key} ({typ}, default {getattr(obj, f.name)!r})")
            if key in docs:
                lines.append(f"      {docs[key]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py",
        description="Train or evaluate the fused ViLT+CLIP VQA model with DeepSpeed ZeRO. Launch with "
        "`deepspeed --num_gpus N trainer/main.py ...`, `torchrun`, or plainly with `python trainer/main.py ...`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_fields_epilog(),
    )
    p.add_argument(
        "--preset",
        default=None,
        help=f"named configuration to start from: {', '.join(sorted(PRESETS))} (default: tiny; on --resume the "
        f"run's saved config.json is used instead)",
    )
    p.add_argument(
        "--train-data", metavar="DIR", help="training shard folder written by data_pipeline.convert"
    )
    p.add_argument("--val-data", metavar="DIR", help="evaluation shard folder (same answer vocabulary)")
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        default="runs/latest",
        help="where config, tokenizer, checkpoints, TensorBoard events and predictions go (default: runs/latest)",
    )
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (= --set train.max_steps=N)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="latest|TAG",
        help="continue the run in --run-dir from its newest complete checkpoint (latest, the default) or a tag "
        "such as global_step1000 (or global_step1000_universal after `python -m trainer.checkpointing "
        "to-universal`, to resume on a different number of ranks)",
    )
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        metavar="FILE",
        help="DeepSpeed JSON (ZeRO stage, precision, communication, offload, gradient clipping); default "
        "deepspeed_configs/zero2_bf16.json on GPUs, zero2_fp32.json on CPU",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any configuration field (repeatable); fields are listed below",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate on --val-data (after --resume, the checkpoint's weights) and write predictions; no training",
    )
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed/torch launchers; the LOCAL_RANK environment variable takes precedence",
    )
    return p


def resolve_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """Preset (or the run's saved config on --resume), then --train-data/--val-data/--max-steps, then --set."""
    saved = run_dir / CONFIG_FILE
    if args.resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} has no {CONFIG_FILE} (not a run folder?)")
        if args.preset:
            log.warning(
                "--preset %s ignored: a resumed run continues with its saved %s", args.preset, CONFIG_FILE
            )
        cfg = config_from_dict(json.loads(saved.read_text()))
    else:
        cfg = get_preset(args.preset or "tiny")
    overrides = []
    if args.train_data:
        overrides.append(f"data.train_data={args.train_data}")
    if args.val_data:
        overrides.append(f"data.val_data={args.val_data}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    return apply_overrides(cfg, overrides + list(args.set))


# -- checks before any process group exists ----------------------------------------------------------------------
def check_data(folder: str | None, what: str, world_size: int, required: bool) -> dict[str, Any] | None:
    """Fail before start-up on a missing folder or fewer shards than ranks; returns the folder's manifest."""
    from data_pipeline.sharding import read_manifest

    if folder is None:
        if required:
            raise ConfigError(f"{what}: no shard folder given (--{what.replace('_', '-')} DIR)")
        return None
    manifest = read_manifest(folder)
    n_shards = sum(1 for s in manifest["shards"] if s.get("samples", 0) > 0)
    if n_shards < world_size:
        raise ConfigError(
            f"--{what.replace('_', '-')} {folder}: {n_shards} shard(s) for {world_size} ranks; every rank needs at "
            f"least one: convert again with a smaller --shard-size"
        )
    return manifest


def ds_config_path(arg: str | None) -> Path:
    from trainer.engine import default_ds_config_path

    if arg:
        return Path(arg)
    import torch

    return default_ds_config_path(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def check_run_dir(run_dir: Path, resume: str | None, eval_only: bool) -> None:
    """A fresh run never writes into a folder that holds checkpoints (it would overwrite them)."""
    from trainer.checkpointing import list_complete

    if resume or eval_only:
        return
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found = ", ".join(r.tag for r in list_complete(ckpts)) or "incomplete ones"
        raise ConfigError(
            f"--run-dir {run_dir} already holds checkpoints ({found}): pass --resume to continue that run, "
            f"or choose another --run-dir"
        )


def check_tokenizer_source(cfg: RunConfig, run_dir: Path) -> None:
    """The question tokenizer comes from the run folder, a pretrained ViLT, or the training questions."""
    if (
        (run_dir / TOKENIZER_DIR / TOKENIZER_META).is_file()
        or cfg.model.vilt_pretrained
        or cfg.data.train_data
    ):
        return
    raise ConfigError(
        f"no question tokenizer in {run_dir / TOKENIZER_DIR} and nothing to build one from: "
        f"give --train-data (or model.vilt_pretrained), or --run-dir of a trained run"
    )


# -- building the run --------------------------------------------------------------------------------------------
def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # DeepSpeed's own INFO lines (config dumps, per-step timers) would drown the trainer's.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def build_tokenizer(cfg: RunConfig, run_dir: Path, dist: D.DistInfo):
    """The run's question tokenizer, saved in the run folder: built once by rank 0, loaded by everyone."""
    from data_pipeline.sharding import iter_sample_json, open_folder
    from data_pipeline.text import CLIP_VOCAB_FILE, QuestionTokenizer

    tok_dir = run_dir / TOKENIZER_DIR
    m = cfg.model
    compact = m.clip_text_vocab == "compact" and m.contrastive != "none"

    def questions():
        assert cfg.data.train_data, "check_tokenizer_source ran before start-up"
        return (s["question"] for s in iter_sample_json(open_folder(cfg.data.train_data)))

    if dist.is_main and not (tok_dir / TOKENIZER_META).is_file():
        if m.vilt_pretrained:
            tok = QuestionTokenizer.from_pretrained_vilt(
                m.vilt_pretrained,
                clip_arch=m.clip_arch,
                max_text_len=m.max_text_len,
                clip_context_length=m.clip_context_length,
            )
            if compact:
                tok.fit_clip_vocab(questions())
            tok.save(tok_dir)
        else:
            QuestionTokenizer.build(
                questions(),
                tok_dir,
                clip_arch=m.clip_arch,
                max_text_len=m.max_text_len,
                clip_context_length=m.clip_context_length,
                vocab_size=m.wordpiece_vocab_size,
                fit_clip_vocab=compact,
            )
    elif dist.is_main and compact and not (tok_dir / CLIP_VOCAB_FILE).is_file():
        # A tokenizer an earlier run left in this folder without the CLIP ids: add them (the ViLT side is kept).
        tok = QuestionTokenizer.load(tok_dir)
        tok.fit_clip_vocab(questions())
        tok.save(tok_dir)
    D.barrier()
    return QuestionTokenizer.load(tok_dir)


def read_answer_types(folder: str) -> dict[int, str]:
    """question_id -> answer_type where the shards carry one (VQA v2); {} for data without types (easy-VQA)."""
    from data_pipeline.sharding import iter_sample_json, open_folder

    out: dict[int, str] = {}
    for meta in iter_sample_json(open_folder(folder)):
        kind = meta.get("answer_type")
        if not kind:
            return out  # every sample of a folder has a type or none does
        out[int(meta["question_id"])] = str(kind)
    return out


class Run:
    """The pieces of one run, built in order; `train()` and `evaluate()` use them."""

    def __init__(self, args: argparse.Namespace, cfg: RunConfig, run_dir: Path, dist: D.DistInfo) -> None:
        import torch

        from data_pipeline.loader import read_answers
        from trainer.checkpointing import Checkpointer, resolve_resume
        from trainer.engine import Engine, load_ds_config, resolve_ds_config
        from trainer.metrics import build_logger
        from trainer.task import build_task

        self.args, self.cfg, self.run_dir, self.dist = args, cfg, run_dir, dist
        ref = None
        if args.resume:
            ref = resolve_resume(run_dir / "checkpoints", args.resume, dist.world_size)
        ds_cfg = resolve_ds_config(
            load_ds_config(ds_config_path(args.deepspeed_config)),
            cfg,
            dist.world_size,
            dist.device,
            load_universal=bool(ref and ref.universal),
        )
        data_dir = cfg.data.train_data or cfg.data.val_data
        self.answers = read_answers(data_dir)
        if cfg.data.val_data and read_answers(cfg.data.val_data) != self.answers:
            raise ConfigError(
                f"{cfg.data.val_data} and {data_dir} have different answer vocabularies (answers.json)"
            )
        saved_answers = run_dir / ANSWERS_FILE
        if ref and saved_answers.is_file() and json.loads(saved_answers.read_text()) != self.answers:
            raise ConfigError(
                f"{data_dir}: its answer vocabulary differs from the one {run_dir} was trained with ({ANSWERS_FILE})"
            )
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / CONFIG_FILE)
            (run_dir / DS_CONFIG_FILE).write_text(json.dumps(ds_cfg, indent=2) + "\n")
            # The answer list travels with the run: predict and export must not need the data folder.
            (run_dir / ANSWERS_FILE).write_text(json.dumps(self.answers) + "\n")
        D.barrier()
        self.tokenizer = build_tokenizer(cfg, run_dir, dist)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task = build_task(
            cfg,
            n_answers=len(self.answers),
            vilt_vocab_size=self.tokenizer.vilt_vocab_size,
            clip_vocab=self.tokenizer.clip_vocab,
        )
        torch.manual_seed(cfg.train.seed + 1 + dist.rank)  # per-rank stream for dropout and the like
        self.engine = Engine(self.task, ds_cfg, cfg, dist)
        self.checkpointer = Checkpointer(
            run_dir, self.engine, dist, every=cfg.train.ckpt_every, keep_last=cfg.train.keep_last
        )
        self.resume_state = self.checkpointer.load(ref) if ref else None
        self.metrics = build_logger(run_dir, dist.is_main)
        self.answer_type_of = (
            read_answer_types(cfg.data.val_data) if cfg.data.val_data and dist.is_main else {}
        )

    def loader(self, folder: str, *, train: bool, epoch: int = 0, skip: int = 0):
        from data_pipeline.loader import build_loader

        c = self.cfg
        return build_loader(
            folder,
            tokenizer=self.tokenizer,
            batch_size=c.train.micro_batch_size if train else c.train.eval_micro_batch,
            image_size=c.model.image_size,
            mean=self.task.image_mean,
            std=self.task.image_std,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            train=train,
            seed=c.train.seed,
            epoch=epoch,
            skip_batches=skip,
            kind=c.data.loader,
            num_workers=c.data.num_workers,
            shuffle_buffer=c.data.shuffle_buffer,
            on_short_shard=c.data.on_short_shard,
            device=self.dist.device,
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate on --val-data on every rank; rank 0 logs `val/...` and writes the predictions file."""
        from data_pipeline.loader import read_manifest
        from trainer.evaluation import evaluate, write_results
        from trainer.loop import shielded

        folder = self.cfg.data.val_data
        if not folder:
            return {}
        result = evaluate(
            self.engine,
            shielded(self.loader(folder, train=False)),
            answers=self.answers,
            device=self.dist.device,
            answer_type_of=self.answer_type_of,
            has_answers=bool(read_manifest(folder).get("has_answers", True)),
        )
        metrics = result.metrics()
        if self.dist.is_main:
            self.metrics.log(metrics, step)
            pred_path, _ = write_results(result, self.run_dir / "eval", step)
            score = "n/a (no answers)" if result.vqa_score is None else f"{result.vqa_score:.4f}"
            log.info(
                "step %d: val VQA score %s on %d questions (%.1f s) -> %s",
                step,
                score,
                result.count,
                result.seconds,
                pred_path,
            )
        return metrics

    def train(self, stop: Any) -> str:
        from trainer.loop import TrainLoop

        assert self.cfg.data.train_data is not None
        train_data = self.cfg.data.train_data
        loop = TrainLoop(
            self.cfg,
            self.engine,
            self.dist,
            make_loader=lambda epoch, skip: self.loader(train_data, train=True, epoch=epoch, skip=skip),
            metrics=self.metrics,
            checkpointer=self.checkpointer,
            evaluate=self.evaluate if self.cfg.data.val_data else None,
            stop=stop,
        )
        if self.resume_state is not None:
            loop.load_state_dict(self.resume_state)
        if self.cfg.train.eval_at_start and self.cfg.data.val_data:
            self.evaluate(loop.step)
        reason = loop.run()
        if reason == "done" and self.cfg.data.val_data:
            self.evaluate(loop.step)
        return reason

    def current_step(self) -> int:
        return int(self.resume_state["step"]) if self.resume_state else 0

    def log_hparams(self) -> None:
        hp = self.cfg.to_dict()
        hp["run"] = {
            "world_size": self.dist.world_size,
            "zero_stage": self.engine.zero_stage,
            "precision": self.engine.precision,
            "grad_accum": self.engine.grad_accum,
        }
        self.metrics.log_hparams(hp)


def lock_run_dir(run_dir: Path, dist: D.DistInfo) -> Any:
    """Rank 0 takes the run folder's lock (trainer/runlock.py); every rank learns the outcome, so that all ranks of a
    refused job stop with the same one-line error instead of waiting on rank 0."""
    from trainer.runlock import RunLock, RunLockedError

    lock, refused = RunLock(run_dir), None
    if dist.is_main:
        try:
            lock.acquire()
        except RunLockedError as exc:
            refused = str(exc)
    refused = D.broadcast_object(refused)
    if refused:
        raise RunLockedError(refused)
    return lock


# -- main --------------------------------------------------------------------------------------------------------
# Errors that mean "the input is wrong" (a one-line message, exit 2) rather than "the program failed" (a traceback).
# Looked up among the modules already imported, so that failing fast never waits for the model libraries to load.
BAD_INPUT_ERRORS = (
    ("data_pipeline.sharding", "DataError"),
    ("data_pipeline.text", "TokenizerError"),
    ("trainer.model", "ModelBuildError"),
)


def is_bad_input(exc: BaseException) -> bool:
    if isinstance(exc, ConfigError):
        return True
    for module, name in BAD_INPUT_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own message for an unknown option
        return int(exc.code or 0)
    setup_logging()
    from trainer.checkpointing import CheckpointSpaceError
    from trainer.loop import NonFiniteLossError, StopRequest

    run_dir = Path(args.run_dir)
    stop = StopRequest()
    lock = None
    try:
        # Everything that can be checked without a process group fails here, in seconds.
        cfg = resolve_config(args, run_dir)
        world = D.env_world_size()
        check_data(cfg.data.train_data, "train_data", world, required=not args.eval_only)
        check_data(cfg.data.val_data, "val_data", world, required=args.eval_only)
        cfg.train.grad_accum(world)
        from trainer.engine import load_ds_config

        load_ds_config(ds_config_path(args.deepspeed_config))
        check_run_dir(run_dir, args.resume, args.eval_only)
        check_tokenizer_source(cfg, run_dir)

        # Installed before any loader worker is forked, so that workers inherit it instead of dying on SIGTERM.
        stop.install()
        dist = D.init_distributed(local_rank_arg=args.local_rank)
        if not args.eval_only:  # evaluation may run beside the training job (it writes only eval/ files)
            lock = lock_run_dir(run_dir, dist)
        run = Run(args, cfg, run_dir, dist)
        run.log_hparams()
        if args.eval_only:
            if not args.resume:
                log.warning("--eval-only without --resume: evaluating freshly initialised weights")
            run.evaluate(run.current_step())
            reason = "done"
        else:
            reason = run.train(stop)
        run.metrics.close()
        if reason == "interrupted":
            assert stop.signum is not None
            log.warning("stopped by signal %d after saving a checkpoint", stop.signum)
            return 128 + stop.signum
        return 0
    except (NonFiniteLossError, CheckpointSpaceError) as exc:  # before `Exception`, which they also are
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not is_bad_input(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()
        D.destroy()


if __name__ == "__main__":
    sys.exit(main())
