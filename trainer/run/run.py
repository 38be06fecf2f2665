"""Building one run from its components: engine, checkpointer, metrics, loaders, evaluation; then training it.

`Run(request, cfg, folder, dist)` resolves the checkpoint to resume from and the DeepSpeed config, prepares the run
folder (trainer/run/run_folder.py), builds the task and its `Engine`, the `Checkpointer` and the metrics logger, and loads
the checkpoint; `train(stop)` hands them to the `TrainLoop`, `evaluate(step)` scores --val-data on every rank.
`lock_run_dir` takes the run folder's lock before a training job builds anything in it. trainer/main.py checks the
input before any of this is built and decides the exit status.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.checkpoint.checkpointing import Checkpointer, set_aside_incomplete
from trainer.checkpoint.layout import ResumeFindings, resolve_resume
from trainer.config.config import ConfigError, RunConfig
from trainer.engine import dist as D
from trainer.engine.engine import Engine, default_ds_config_path, load_ds_config, resolve_ds_config
from trainer.modeling import text_lengths
from trainer.run import run_folder
from trainer.run.evaluation import evaluate, read_references, write_results
from trainer.run.loop import TrainLoop
from trainer.run.metrics import build_logger
from trainer.run.preemption import shielded
from trainer.run.run_folder import RunFolder
from trainer.run.runlock import RunLock, RunLockedError

if TYPE_CHECKING:
    from data_pipeline.loaders.spec import LoaderSpec
    from trainer.checkpoint.layout import CheckpointRef
    from trainer.run.start import RunRequest

INITIAL_EVAL = "initial"  # RUN/eval/initial: --eval-only --resume none, freshly initialised weights

log = logging.getLogger(__name__)


def ds_config_path(arg: str | None) -> Path:
    """--deepspeed_config, else the default for this host's device (trainer/engine/engine.py)."""
    if arg:
        return Path(arg)
    return default_ds_config_path(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


class Run:
    """The pieces of one run, built in order; `train()` and `evaluate()` use them."""

    def __init__(self, request: RunRequest, cfg: RunConfig, folder: RunFolder, dist: D.DistInfo) -> None:
        self.request, self.cfg, self.run_dir, self.dist = request, cfg, folder.path, dist
        if dist.is_main and not request.eval_only:
            # Under the run folder's lock: a save cut off earlier is set aside before anything else looks.
            set_aside_incomplete(self.run_dir / "checkpoints")
        ref, failed = self._choose_checkpoint(request.resume) if request.resume else (None, [])
        ds_cfg = resolve_ds_config(
            load_ds_config(ds_config_path(request.deepspeed_config)),
            cfg.train,
            cfg.optim,
            dist.world_size,
            load_universal=bool(ref and ref.universal),
        )
        answers = run_folder.data_answers(cfg)
        if ref:
            folder.check_answers(answers, cfg.data.train_data or cfg.data.val_data or "")
        own = self._own_folder(folder, ref, cfg, ds_cfg, answers)
        self.out_dir = own.path
        """Where this run's evaluations (eval/) and TensorBoard events go: the run folder, or for --eval-only its
        evaluation folder RUN/eval/<tag>."""
        # The same seed on every rank: identical initial weights.
        _, self.tokenizer, self.answers, self.task = run_folder.load(own, config=cfg, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed + 1 + dist.rank)  # per-rank stream for dropout and the like
        # Every question tokenised once; the model's text cut to the data's longest question (trainer/modeling/text_lengths.py).
        self.questions = text_lengths.prepare(cfg, self.tokenizer, self.task.model, is_main=dist.is_main)
        self.engine = Engine(
            self.task, ds_cfg, dist, optim=cfg.optim, max_steps=cfg.train.max_steps, compile=cfg.model.compile
        )
        self.checkpointer = Checkpointer(
            self.run_dir, self.engine, dist, every=cfg.train.ckpt_every, keep_last=cfg.train.keep_last
        )
        self.checkpointer.failed.update(failed)
        self.resume_state = self.checkpointer.load(ref) if ref else None
        if ref and not request.eval_only:  # only now: a start that could not resume has changed nothing
            folder.record(cfg, ds_cfg, answers, dist)
        self.metrics = build_logger(self.out_dir, dist.is_main)
        val = cfg.data.val_data
        self.references = read_references(val, cfg.train.vqa_rule) if val and dist.is_main else {}
        # The job's stop request (trainer/run/preemption.py), which abandons an evaluation; set by `train` or the caller.
        self.stop: Any = None
        self.eval_abandoned = False

    def _own_folder(
        self, folder: RunFolder, ref: CheckpointRef | None, cfg: RunConfig, ds_cfg: dict, answers: list[str]
    ) -> RunFolder:
        """The folder this start writes: the run folder (started afresh, or prepared for a resume), or for
        --eval-only its own evaluation folder."""
        if self.request.eval_only:
            # An evaluation writes only under its own folder, named by the weights it scores; the run's config,
            # answers, tokenizer, checkpoints and TensorBoard curves are only read.
            own = RunFolder(self.run_dir / "eval" / (ref.tag if ref else INITIAL_EVAL))
            own.start_evaluation(cfg, ds_cfg, answers, folder, self.dist)
            what = f"checkpoint {ref.tag} (step {ref.step})" if ref else "freshly initialised weights"
            log.info("--eval-only: evaluating %s; results in %s", what, own.path)
            return own
        if ref is None:
            folder.start(cfg, ds_cfg, answers, self.dist)
        else:
            folder.prepare_resume(cfg, self.dist)
        return folder

    def _choose_checkpoint(self, which: str) -> tuple[CheckpointRef, list[str]]:
        """Rank 0 finds the checkpoint `--resume which` means, checking its files against their content hashes
        (train.verify_checkpoints), and says what it passed over; every rank then takes the same tag, or stops with
        rank 0's one-line error. The tags that failed their check are returned: the run never prunes or replaces
        them."""
        ckpt_dir = self.run_dir / "checkpoints"
        verify = self.cfg.train.verify_checkpoints
        decision: tuple[str | None, str | None, list[str]] | None = None
        if self.dist.is_main:
            found = ResumeFindings()
            t0 = time.perf_counter()
            try:
                ref = resolve_resume(ckpt_dir, which, self.dist.world_size, verify=verify, findings=found)
                decision = (ref.tag, None, found.failed)
            except ConfigError as exc:
                decision = (None, str(exc), found.failed)
            for note in found.notes:
                log.warning("%s", note)
            if verify and decision[0]:
                log.info(
                    "checked %s against its content hashes in %.2f s", decision[0], time.perf_counter() - t0
                )
            elif not verify:
                log.warning(
                    "train.verify_checkpoints=false: %s resumed without checking its content hashes", which
                )
        tag, error, failed = D.broadcast_object(decision)
        if error is not None:
            raise ConfigError(error)
        assert tag is not None
        return resolve_resume(ckpt_dir, tag, self.dist.world_size), failed

    def loader_spec(self, *, train: bool) -> LoaderSpec:
        """How this rank reads shards for training or evaluation (data_pipeline/loaders/spec.py), from the config's sections."""
        # The loaders are imported where a run reads data, not at the top: trainer/main.py imports this module, and
        # its --help need not wait for the loader stack (DALI's and PyTorch's loaders, PIL).
        from data_pipeline.loaders.loader import LoaderSpec

        t, d, data = self.cfg.train, self.dist, self.cfg.data
        return LoaderSpec(
            tokenizer=self.tokenizer,
            batch_size=t.micro_batch_size if train else t.eval_micro_batch,
            image_size=self.cfg.model.image_size,
            mean=self.task.image_mean,
            std=self.task.image_std,
            train=train,
            seed=t.seed,
            rank=d.rank,
            world_size=d.world_size,
            kind=data.loader,
            num_workers=data.num_workers,
            shuffle_buffer=data.shuffle_buffer,
            device=d.device,
            on_short_shard=data.on_short_shard,
            host_workers=data.host_workers,
            hw_decoder_load=data.dali_hw_decoder_load,
            prefetch_depth=data.dali_prefetch_depth,
            questions=self.questions.get(train),
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate on --val-data on every rank; rank 0 logs `val/...` and writes the predictions file."""
        from data_pipeline.loaders.loader import build_loader, read_manifest

        folder = self.cfg.data.val_data
        if not folder:
            return {}
        loader = build_loader(folder, self.loader_spec(train=False))
        result = evaluate(
            self.engine,
            shielded(loader),
            answers=self.answers,
            device=self.dist.device,
            references=self.references,
            has_answers=bool(read_manifest(folder).get("has_answers", True)),
            progress=self.dist.is_main and self.cfg.train.progress_bar,
            total=len(loader),
            vqa_rule=self.cfg.train.vqa_rule,
            stop=(lambda: self.stop.requested) if self.stop is not None else None,
        )
        if result.abandoned:
            self.eval_abandoned = True
            log.warning(
                "step %d: evaluation abandoned after %d of %d batches on a stop request; "
                "no val/ scores or eval files for this step",
                *(step, result.abandoned_after, len(loader)),
            )
            return {}
        metrics = result.metrics()
        if self.dist.is_main:
            self.metrics.log(metrics, step)
            out = self.out_dir if self.request.eval_only else self.run_dir / "eval"
            pred_path, _ = write_results(result, out, step)
            score = "n/a (no answers)" if result.vqa_score is None else f"{result.vqa_score:.4f}"
            log.info(
                "step %d: val VQA score %s on %d questions (%.1f s) -> %s",
                *(step, score, result.count, result.seconds, pred_path),
            )
        return metrics

    def train(self, stop: Any) -> str:
        from data_pipeline.loaders.loader import build_loader

        assert self.cfg.data.train_data is not None
        self.stop = stop
        train_data, val = self.cfg.data.train_data, self.cfg.data.val_data
        spec = self.loader_spec(train=True)
        loop = TrainLoop(
            self.cfg.train,
            self.engine,
            self.dist,
            make_loader=lambda epoch, skip, state: build_loader(train_data, spec.at(epoch, skip, state)),
            metrics=self.metrics,
            checkpointer=self.checkpointer,
            evaluate=self.evaluate if val else None,
            stop=stop,
        )
        if self.resume_state is not None:
            loop.load_state_dict(self.resume_state)
        if self.cfg.train.eval_at_start and val:
            self.evaluate(loop.step)
        reason = loop.run()
        if reason == "done" and val:
            self.evaluate(loop.step)
            if self.eval_abandoned:  # the final checkpoint is written; the stop is what the exit status says
                reason = "interrupted"
        return reason

    def current_step(self) -> int:
        return int(self.resume_state["step"]) if self.resume_state else 0

    def log_hparams(self) -> None:
        hp = self.cfg.to_dict()
        e = self.engine
        hp["run"] = {
            "world_size": self.dist.world_size,
            "zero_stage": e.zero_stage,
            "precision": e.precision,
            "grad_accum": e.grad_accum,
        }
        self.metrics.log_hparams(hp)


def lock_run_dir(run_dir: Path, dist: D.DistInfo) -> Any:
    """Rank 0 takes the run folder's lock (trainer/run/runlock.py); every rank learns the outcome, so that all ranks of a
    refused job stop with the same one-line error instead of waiting on rank 0."""
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
