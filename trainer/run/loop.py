"""The training loop: micro-batches -> engine, and the cadence of logging, evaluation and checkpoints.

`TrainLoop.run()` reads top to bottom: for each optimizer step it feeds `grad_accum` micro-batches through the engine,
then lets the logger, evaluator and checkpointer act when due. Its `state_dict()` is the resume contract: step,
epoch, micro-batches consumed in the epoch (the loader position), samples seen, skipped batches. Beside it, each
rank's loader may hand over its own saved position (`loader.state(k)`: DALI's checkpoint, which resumes without
decoding the consumed batches); it is saved per rank and given back to the first loader of a resumed run.

Host synchronisation happens only on logging, evaluation and checkpoint steps: losses are summed on the device, and
the non-finite check is a device-side flag per micro-batch that is read at those points. With
`train.on_nonfinite=stop` a NaN/inf loss therefore stops the run at the next such point, naming the first failing
step and its question ids, and no checkpoint is written after it. `train.on_nonfinite=skip` has to decide before
backward, so it reads the flag on every micro-batch (one host sync each) and replaces a bad micro-batch with the
next one, agreed across ranks so that every rank keeps calling the same collectives.

A stop request (SIGTERM/SIGINT) may reach only some ranks, so each step ends with a one-integer all-reduce of the
request over the gloo control group: a host-side collective that never waits on the GPU stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from common.progress import bar_refreshes, logs_lines, progress_bar
from trainer.config.config import TrainConfig
from trainer.engine import dist as D
from trainer.modeling.loss_names import LOSS_NAMES, loss_tag
from trainer.run.metrics import MetricsLogger
from trainer.run.preemption import StopRequest, shielded

log = logging.getLogger(__name__)

# A run that meets this many non-finite micro-batches in a row under on_nonfinite=skip stops anyway: the weights
# themselves are broken, and skipping forever would only burn the allocation.
MAX_CONSECUTIVE_SKIPS = 20


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss; the message names the step and the batch's question ids."""


class EngineLike(Protocol):
    """What the loop needs of an engine (trainer/engine/engine.py `Engine`)."""

    @property
    def grad_accum(self) -> int: ...

    def train(self, mode: bool = True) -> None: ...

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, *, measure_grad_norm: bool = False) -> None: ...

    def lr(self) -> float: ...

    def grad_norm(self) -> float | None: ...


class CheckpointerLike(Protocol):
    """What the loop needs of a checkpointer (trainer/checkpoint/checkpointing.py `Checkpointer`): asked after every step whether
    a checkpoint is due (it owns the cadence), and given the loop's state to save with the engine's."""

    def due(self, step: int) -> bool: ...

    def save(self, step: int, trainer_state: dict[str, Any], loader_state: bytes | None = None) -> Path: ...


class TrainLoop:
    """Owns the training position and the cadence; knows nothing about models, DeepSpeed or data formats."""

    def __init__(
        self,
        train: TrainConfig,
        engine: EngineLike,
        dist: D.DistInfo,
        *,
        make_loader: Callable[[int, int, bytes | None], Iterable[dict[str, Any]]],
        metrics: MetricsLogger,
        checkpointer: CheckpointerLike | None = None,
        evaluate: Callable[[int], dict[str, float]] | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.t = train
        self.engine = engine
        self.dist = dist
        self.make_loader = make_loader
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.evaluate = evaluate
        self.stop = stop or StopRequest()
        self.accum = engine.grad_accum
        # Resume contract.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples = 0
        self.skipped = 0
        self.last_saved_step = -1
        self._loader: Any = None  # this epoch's loader, asked for its position when a checkpoint is written
        self._resume_loader_state: bytes | None = None
        # Per-interval accumulators (device tensors; read on logging steps only).
        self._reset_interval()

    # -- state contract ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples": self.samples,
            "skipped": self.skipped,
            "micro_batch_size": self.t.micro_batch_size,
            "grad_accum": self.accum,
            "seed": self.t.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.samples = int(state["samples"])
        self.skipped = int(state.get("skipped", 0))
        old_world = int(state.get("world_size", self.dist.world_size))
        old_micro = int(state.get("micro_batch_size", self.t.micro_batch_size))
        batch = int(state["batch_in_epoch"])
        if old_world != self.dist.world_size or old_micro != self.t.micro_batch_size:
            # Another world size sees another per-rank order: keep the same fraction of the epoch consumed.
            batch = batch * old_world * old_micro // (self.dist.world_size * self.t.micro_batch_size)
            log.warning(
                "world size %d -> %d: epoch %d continues at micro-batch %d of this world size's order "
                "(the same fraction of the epoch; the data order is not the old run's)",
                old_world,
                self.dist.world_size,
                self.epoch,
                batch,
            )
        self.batch_in_epoch = batch
        self.last_saved_step = self.step
        # This rank's loader position, loaded by the checkpointer beside the state; only for the same reading.
        same_reading = old_world == self.dist.world_size and old_micro == self.t.micro_batch_size
        self._resume_loader_state = state.get("loader_state") if same_reading else None

    # -- data ----------------------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever, epoch after epoch; `batch_in_epoch` counts those handed out (the resume point)."""
        while True:
            loader = self.make_loader(self.epoch, self.batch_in_epoch, self._resume_loader_state)
            self._resume_loader_state, self._loader = None, loader
            produced = False
            for batch in shielded(loader):
                produced = True
                self.batch_in_epoch += 1
                yield batch
            if not produced and self.batch_in_epoch == 0:
                raise RuntimeError(f"the training loader yielded no batch in epoch {self.epoch}")
            self.epoch += 1
            self.batch_in_epoch = 0

    def loader_state(self) -> bytes | None:
        """This rank's loader position at `batch_in_epoch`, where its loader keeps one (see the module docstring)."""
        get = getattr(self._loader, "state", None)
        return get(self.batch_in_epoch) if get is not None and self.batch_in_epoch > 0 else None

    def _next(self, it: Iterator[dict[str, Any]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = next(it)
        self._wait += time.perf_counter() - t0
        return batch

    # -- one optimizer step --------------------------------------------------------------------------------------
    def _reset_interval(self) -> None:
        self._t0 = time.perf_counter()
        self._wait = 0.0
        self._interval_samples = 0
        self._sums: torch.Tensor | None = None
        self._n_micro = 0
        self._finite: list[torch.Tensor] = []
        self._finite_where: list[tuple[int, torch.Tensor]] = []

    def _log_due(self, step: int) -> bool:
        return step % self.t.log_every == 0 or step == self.t.max_steps

    def _train_step(self, it: Iterator[dict[str, Any]]) -> None:
        measure_norm = self._log_due(
            self.step + 1
        )  # the engine's gradient norm is read on logging steps only
        micro = 0
        consecutive_skips = 0
        while micro < self.accum:
            batch = self._next(it)
            out = self.engine.forward(batch)
            loss = out["loss"]
            if self.t.on_nonfinite == "skip":
                bad = D.any_rank(not bool(torch.isfinite(loss.detach()).item()))
                if bad:
                    self.skipped += 1
                    consecutive_skips += 1
                    log.warning(
                        "step %d: non-finite loss on a rank, batch skipped (this rank's question ids %s)",
                        self.step + 1,
                        _ids(batch),
                    )
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        raise NonFiniteLossError(
                            f"step {self.step + 1}: {consecutive_skips} non-finite batches in a row "
                            f"(last question ids {_ids(batch)}): the weights are broken, stopping"
                        )
                    continue
            else:
                self._finite.append(torch.isfinite(loss.detach()).reshape(1))
                self._finite_where.append((self.step + 1, batch["question_id"]))
            self.engine.backward(loss)
            self.engine.step(measure_grad_norm=measure_norm)
            parts = torch.stack([out[name].detach() for name in LOSS_NAMES])
            self._sums = parts.float() if self._sums is None else self._sums + parts.float()
            self._n_micro += 1
            micro += 1
        self.step += 1
        step_samples = self.t.global_batch_size
        self.samples += step_samples
        self._interval_samples += step_samples

    def check_finite(self) -> None:
        """Read the per-micro-batch finite flags (a host sync) and stop every rank if any rank saw NaN/inf."""
        if not self._finite:
            return
        flags = torch.cat(self._finite).cpu()
        local_bad = not bool(flags.all())
        if D.any_rank(local_bad):
            if local_bad:
                i = int((~flags).nonzero()[0, 0])
                step, qids = self._finite_where[i]
                where = f"step {step} (question ids on rank {self.dist.rank}: {_ids({'question_id': qids})})"
            else:
                where = (
                    f"a step after {self.last_saved_step} on another rank (this rank's losses were finite)"
                )
            raise NonFiniteLossError(
                f"non-finite loss at {where}; stopping without writing a checkpoint "
                f"(set train.on_nonfinite=skip to skip such batches instead)"
            )
        self._finite.clear()
        self._finite_where.clear()

    # -- cadence -------------------------------------------------------------------------------------------------
    def _log(self) -> dict[str, float]:
        self.check_finite()
        assert self._sums is not None
        sums = D.all_reduce_sum(self._sums) / (self._n_micro * self.dist.world_size)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        m = {
            **{loss_tag(name): float(x) for name, x in zip(LOSS_NAMES, sums.tolist(), strict=True)},
            "train/lr": self.engine.lr(),
            "train/samples_per_second": self._interval_samples / elapsed,
            "train/data_wait_fraction": min(1.0, self._wait / elapsed),
            "train/samples_seen": float(self.samples),  # beside the step: runs of other batch sizes line up
        }
        norm = self.engine.grad_norm()
        if norm is not None:
            m["train/grad_norm"] = norm
        if self.dist.device.type == "cuda":
            m["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        self.metrics.log(m, self.step)
        self._reset_interval()
        return m

    def _save(self) -> None:
        if self.checkpointer is None or self.last_saved_step == self.step:
            return
        self.check_finite()  # never write a checkpoint of weights that a NaN step touched
        self.checkpointer.save(self.step, self.state_dict(), self.loader_state())
        self.last_saved_step = self.step

    def run(self) -> str:
        """Train to max_steps. Returns "done", or "interrupted" after a SIGTERM/SIGINT checkpoint."""
        t = self.t
        bar = progress_bar(
            self.dist.is_main and t.progress_bar,
            total=t.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
        )
        self.engine.train(True)
        it = self._micro_batches()
        self._reset_interval()
        try:
            while self.step < t.max_steps:
                self._train_step(it)
                bar.update(1)
                if self._log_due(self.step):
                    self._report(self._log(), bar)
                if self.evaluate is not None and t.eval_every and self.step % t.eval_every == 0:
                    if self.step < t.max_steps:  # the final evaluation is the caller's
                        self.check_finite()
                        self.evaluate(self.step)
                        self.engine.train(True)
                        self._reset_interval_clock()
                if D.any_rank(self.stop.requested):
                    self._save()
                    return "interrupted"
                if self.checkpointer is not None and self.checkpointer.due(self.step):
                    self._save()
                    self._reset_interval_clock()
            self.check_finite()
            self._save()
            return "done"
        finally:
            it.close()  # releases the loader (and its workers) now, not at garbage collection
            bar.close()

    def _report(self, m: dict[str, float], bar: Any) -> None:
        """A logged step on the console: the bar's postfix, and a log line where the bar is off or not on a terminal
        (a batch job's log file shows every logged step, not one bar redrawn a minute)."""
        bar.set_postfix(
            {"loss": f"{m['train/loss']:.4f}", "samples/s": f"{m['train/samples_per_second']:.0f}"},
            refresh=bar_refreshes(bar),
        )
        if self.dist.is_main and logs_lines(bar):
            log.info(
                "step %d/%d loss %.4f (vqa %.4f, infonce %.4f) lr %.2e %.0f samples/s",
                *(self.step, self.t.max_steps, *(m[loss_tag(name)] for name in LOSS_NAMES)),
                *(m["train/lr"], m["train/samples_per_second"]),
            )

    def _reset_interval_clock(self) -> None:
        """Evaluation and checkpoint time is not training time: restart the throughput clock, keep the sums."""
        self._t0 = time.perf_counter()
        self._wait = 0.0
        self._interval_samples = 0


def _ids(batch: dict[str, Any], limit: int = 32) -> list[int]:
    qid = batch.get("question_id")
    if qid is None:
        return []
    ids = [int(x) for x in torch.as_tensor(qid).reshape(-1).tolist()]
    return ids[:limit] + (["..."] if len(ids) > limit else [])  # type: ignore[list-item]
