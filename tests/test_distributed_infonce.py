"""Global-batch negatives: 2 ranks x B equal 1 process x 2B, in loss and every parameter gradient (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import (
    N_ANSWERS,
    VOCAB,
    parse_variant,
    synthetic_batch,
    tiny_config,
    to_double,
    with_duplicate_questions,
)
from trainer.modeling.task import build_task

# Two gloo ranks on local ports; each waits up to 300 s for the other.
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

WORKER = Path(__file__).parent / "helpers" / "parity_worker.py"
PER_RANK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `+mask` / `+positive`: loss.duplicate_questions on a batch with identical questions within and across ranks.
VARIANTS = [
    "clip-infonce-cos",
    "clip-infonce-dot",
    "clip-symmetric-ce",
    "clip-infonce-dot+mask",
    "clip-infonce-cos+positive",
]


def _run_two_ranks(variants: list[str], out: Path) -> dict:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["OMP_NUM_THREADS"] = "1"
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), ",".join(variants), str(PER_RANK), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out)


# float64 carries ~16 digits; the two computations differ only in the order of their sums (per-rank halves, then the
# all-reduce). Measured: losses within ~2e-16 relative, every gradient tensor within ~1e-14 of its largest entry.
# RTOL leaves a margin of 10^4 over that, while a real difference (a missing cross-rank term) is ~1e-2. Gradients
# that are zero in exact arithmetic (an attention key bias: softmax ignores a constant shift) hold only round-off
# (~1e-21), so each tensor may also differ by ZERO_ATOL of the largest gradient entry of the whole model.
RTOL = 1e-10
ZERO_ATOL = 1e-13


def assert_equal_to_float64_round_off(
    got: torch.Tensor, want: torch.Tensor, what: str, model_scale: float = 0.0
) -> None:
    own = want.abs().max().item()
    diff = (got - want).abs().max().item()
    limit = RTOL * own + ZERO_ATOL * model_scale
    assert diff <= limit, f"{what}: differs by {diff:.3g} (largest entry {own:.3g}, allowed {limit:.3g})"


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    """One 2-process launch computes every variant (process start-up dominates on 2 cores)."""
    return _run_two_ranks(VARIANTS, tmp_path_factory.mktemp("parity") / "ranks.pt")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_equal_one_process_on_the_global_batch(variant, two_rank_results):
    got = two_rank_results[variant]

    name, loss = parse_variant(variant)
    torch.manual_seed(0)
    task = build_task(
        tiny_config(name, infonce_weight=1.0, temperature=0.5, **loss),
        n_answers=N_ANSWERS,
        vilt_vocab_size=VOCAB,
    )
    task = task.double()
    batch = to_double(synthetic_batch(2 * PER_RANK, seed=7))
    if loss:
        batch = with_duplicate_questions(batch)
        # The check has teeth: on this batch the mode changes the loss.
        plain = build_task(
            tiny_config(name, infonce_weight=1.0, temperature=0.5), n_answers=N_ANSWERS, vilt_vocab_size=VOCAB
        ).double()
        plain.load_state_dict(task.state_dict())
        assert abs(plain(batch)["infonce_loss"].item() - task(batch)["infonce_loss"].item()) > 1e-3
    ref = task(batch)
    ref["loss"].backward()

    expected = torch.stack([ref["loss"].detach(), ref["vqa_loss"], ref["infonce_loss"]])
    assert got["losses"].dtype == torch.float64
    assert_equal_to_float64_round_off(got["losses"], expected, "losses")
    assert got["losses"][2] > 0
    model_scale = max(p.grad.abs().max().item() for p in task.parameters())
    for name, p in task.named_parameters():
        assert_equal_to_float64_round_off(got["grads"][name], p.grad, name, model_scale)
    # The check has teeth: the CLIP towers receive gradient from the cross-rank InfoNCE terms.
    assert any(n.startswith("model.clip.transformer") and g.abs().sum() > 0 for n, g in got["grads"].items())
