"""One rank of the logged-loss check (run by tests/test_reductions.py, 2 processes, gloo): the real training loop
(trainer/run/loop.py) with an engine whose losses are fixed functions of the question ids, so that the figures rank 0
logs can be compared with one process that reads both ranks' micro-batches. Rank 0 writes what it logged as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.logged_loss import QidLossEngine, Recorder, loader_of, train_config  # noqa: E402
from trainer.engine.dist import DistInfo  # noqa: E402
from trainer.run.loop import TrainLoop  # noqa: E402


def main(out: str) -> None:
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    recorder = Recorder()
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    loop = TrainLoop(
        train_config(), QidLossEngine(accum=1), dist, make_loader=loader_of([rank]), metrics=recorder
    )
    assert loop.run() == "done"
    if rank == 0:
        Path(out).write_text(json.dumps(recorder.rows))
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
