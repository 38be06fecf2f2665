"""Mutation check: does the fast test tier catch realistic mistakes that would otherwise give silent wrong results?

    python scripts/mutation_check.py                      # every mutation, report on stdout
    python scripts/mutation_check.py --only loader-mean-std-swapped,lr-logged-one-step-ahead
    python scripts/mutation_check.py --list               # the mutations, one a line
    python scripts/mutation_check.py --out docs/mutation_check.md

Each mutation is one small edit (file, the exact old snippet, its replacement) of the kind that runs without an
error and gives a wrong number: a swapped mean/std, an unscaled accumulation, a reduction over the wrong world size,
a metric rule dropped. The check copies the repository's files (tracked and untracked-but-not-ignored; the real tree
is never modified) into a temporary folder, applies one mutation at a time there and runs the fast tier
(`pytest -m "not slow" -x -q -p no:cacheprovider`, PYTHONPATH the copy), after the mutation's own test files on their
own, so that a caught mutation stops early; a mutation the whole tier passes survives. A snippet that no longer occurs exactly once
is reported as an error, not skipped, so that the list stays in step with the code (tests/test_mutation_list.py
checks that too, in the fast tier). The unmutated tier runs first (`--no-baseline` skips it): a mutation can only
count as caught when the tier passes without it.

Exit status: 0 when every mutation ran and the kill rate reaches --min-kill-rate, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    description: str
    tests: tuple[str, ...] = ()
    """Test files run first (an ordering only: the whole fast tier runs when they pass)."""


M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # -- pixels ----------------------------------------------------------------------------------------------------
    M(
        "loader-mean-std-swapped",
        "data_pipeline/loaders/batch.py",
        "return [float(m) * 255.0 for m in mean], [float(s) * 255.0 for s in std]",
        "return [float(s) * 255.0 for s in std], [float(m) * 255.0 for m in mean]",
        "the loaders' normalisation takes the std as mean and the mean as std",
        ("tests/test_pixels.py",),
    ),
    M(
        "model-clip-mean-std-swapped",
        "trainer/modeling/model.py",
        "self.image_mean = tuple(self.clip.visual.image_mean)\n            self.image_std = tuple(self.clip.visual.image_std)",
        "self.image_mean = tuple(self.clip.visual.image_std)\n            self.image_std = tuple(self.clip.visual.image_mean)",
        "the model hands CLIP's image_std out as its mean and image_mean as its std",
        ("tests/test_pixels.py",),
    ),
    M(
        "predict-bgr",
        "trainer/serve/predict.py",
        "x = x.permute(2, 0, 1).float() / 255.0",
        "x = x.flip(-1).permute(2, 0, 1).float() / 255.0",
        "predict feeds the image in BGR order instead of RGB",
        ("tests/test_pixels.py",),
    ),
    # -- optimisation ----------------------------------------------------------------------------------------------
    M(
        "accumulation-unscaled",
        "trainer/engine/engine.py",
        "self.engine.backward(loss)",
        "self.engine.backward(loss, scale_wrt_gas=False)",
        "the engine's backward does not divide the loss by the gradient accumulation steps",
        ("tests/test_engine_arithmetic.py",),
    ),
    M(
        "fusion-at-clip-lr",
        "trainer/modeling/task.py",
        '"fusion": optim.lr}',
        '"fusion": clip_lr}',
        "the fusion layers train at CLIP's learning rate instead of the base one",
        ("tests/test_model.py",),
    ),
    M(
        "head-lr-mult-dropped",
        "trainer/modeling/task.py",
        '"head": optim.lr * optim.head_lr_mult',
        '"head": optim.lr',
        "the VQA head trains at the base rate, not 10x",
        ("tests/test_model.py",),
    ),
    M(
        "decay-on-norms",
        "trainer/modeling/task.py",
        '"weight_decay": 0.0 if no_decay else optim.weight_decay',
        '"weight_decay": optim.weight_decay',
        "weight decay applied to biases and norms",
        ("tests/test_model.py",),
    ),
    M(
        "schedule-decays-from-zero",
        "trainer/engine/optim.py",
        "return max(0.0, (self.total - step) / max(1, self.total - self.warmup))",
        "return max(0.0, (self.total - step) / max(1, self.total))",
        "the linear decay starts below the peak rate after the warm-up",
        ("tests/test_engine_arithmetic.py",),
    ),
    M(
        "ds-batch-one-rank",
        "trainer/engine/ds_config.py",
        '"gradient_accumulation_steps": train.grad_accum(world_size),',
        '"gradient_accumulation_steps": train.grad_accum(1),',
        "DeepSpeed is given the accumulation steps of one rank whatever the world size",
        ("tests/test_engine_arithmetic.py",),
    ),
    M(
        "config-batch-check-dropped",
        "trainer/config/config.py",
        "if self.global_batch_size % per_step:",
        "if False:",
        "a global batch that is not a multiple of micro-batch x world size is rounded down silently",
        ("tests/test_engine_arithmetic.py",),
    ),
    # -- logged figures --------------------------------------------------------------------------------------------
    M(
        "logged-loss-times-world",
        "trainer/run/loop.py",
        "sums = D.all_reduce_sum(self._sums) / (self._n_micro * self.dist.world_size)",
        "sums = D.all_reduce_sum(self._sums) / self._n_micro",
        "logged training losses are the sum over ranks, i.e. multiplied by the world size",
        ("tests/test_reductions.py",),
    ),
    M(
        "lr-logged-one-step-ahead",
        "trainer/engine/engine.py",
        "self.schedule(max(0, self.engine.lr_scheduler.last_epoch - 1))",
        "self.schedule(max(0, self.engine.lr_scheduler.last_epoch))",
        "train/lr logs the next step's rate, not the one applied",
        ("tests/test_engine_arithmetic.py",),
    ),
    M(
        "eval-no-cross-rank-sum",
        "trainer/run/evaluation.py",
        "sums = D.all_reduce_sum(sums).cpu()",
        "sums = sums.cpu()",
        "evaluation loss and count are rank 0's alone",
        ("tests/test_reductions.py",),
    ),
    M(
        "eval-counts-padding",
        "trainer/run/evaluation.py",
        "sums[1] += valid.sum()",
        "sums[1] += float(valid.numel())",
        "evaluation counts the padding rows of the last batch as questions",
        ("tests/test_eval_metrics.py",),
    ),
    # -- resume ----------------------------------------------------------------------------------------------------
    M(
        "resume-rng-not-restored",
        "trainer/checkpoint/checkpointing.py",
        "        if rng is not None:\n            set_rng_state(rng)",
        "        if rng is not None:\n            pass",
        "a resumed run does not restore its random streams",
        ("tests/test_engine_arithmetic.py",),
    ),
    M(
        "resume-scheduler-not-restored",
        "trainer/engine/engine.py",
        "load_optimizer_states=True, load_lr_scheduler_states=True",
        "load_optimizer_states=True, load_lr_scheduler_states=False",
        "a resumed run restarts the learning-rate schedule",
        ("tests/test_engine_arithmetic.py",),
    ),
    M(
        "samples-counted-per-micro-batch",
        "trainer/run/loop.py",
        "step_samples = self.t.global_batch_size",
        "step_samples = self.t.micro_batch_size",
        "the samples seen (logged throughput, resume state) count one micro-batch per step",
        ("tests/test_engine_loop.py",),
    ),
    M(
        "resume-position-ignored",
        "trainer/run/loop.py",
        "        self.batch_in_epoch = batch\n        self.last_saved_step = self.step",
        "        self.batch_in_epoch = 0\n        self.last_saved_step = self.step",
        "a resumed run starts its epoch over instead of continuing at the saved batch",
        ("tests/test_engine_loop.py",),
    ),
    M(
        "export-drops-int-buffers",
        "trainer/serve/export.py",
        "return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}",
        "return {k: v.float() for k, v in sd.items() if v.is_floating_point()}",
        "the export leaves integer buffers out of the weights",
        ("tests/test_checkpoint_contract.py",),
    ),
    # -- loaders and sharding --------------------------------------------------------------------------------------
    M(
        "dali-seed-ignores-epoch",
        "data_pipeline/loaders/dali_loader.py",
        "reader_seed=sharding.derive_seed(spec.seed, spec.epoch, spec.rank)",
        "reader_seed=sharding.derive_seed(spec.seed, 0, spec.rank)",
        "DALI's reader shuffles every epoch in the same order",
        ("tests/test_loader_order.py",),
    ),
    M(
        "torch-seed-ignores-epoch",
        "data_pipeline/loaders/torch_loader.py",
        '"seed": sharding.derive_seed(seed, epoch, rank, w),',
        '"seed": sharding.derive_seed(seed, 0, rank, w),',
        "the torch loader's shuffle buffer repeats its order every epoch",
        ("tests/test_loader_order.py",),
    ),
    M(
        "shard-order-ignores-epoch",
        "data_pipeline/shards/sharding.py",
        "random.Random(derive_seed(seed, epoch, 0x5AD)).shuffle(order)",
        "random.Random(derive_seed(seed, 0, 0x5AD)).shuffle(order)",
        "the shard order is the same every epoch",
        ("tests/test_loader_order.py",),
    ),
    M(
        "rank-ranges-overlap",
        "data_pipeline/shards/sharding.py",
        "return total * rank // world_size, total * (rank + 1) // world_size",
        "return total * rank // world_size, min(total, total * (rank + 1) // world_size + 1)",
        "neighbouring ranks read one sample twice",
        ("tests/test_data_loader.py",),
    ),
    M(
        "eval-batches-floor",
        "data_pipeline/shards/sharding.py",
        "return math.ceil(math.ceil(total / world_size) / batch_size)",
        "return math.ceil(total / world_size) // batch_size",
        "evaluation drops the last partial batch of each rank",
        ("tests/test_data_loader.py",),
    ),
    M(
        "targets-ignore-scores",
        "data_pipeline/loaders/batch.py",
        'targets[i, torch.tensor(labels, dtype=torch.long)] = torch.tensor(\n                m["scores"], dtype=torch.float32\n            )',
        "targets[i, torch.tensor(labels, dtype=torch.long)] = 1.0",
        "training targets are 1 for every annotated answer instead of its soft score",
        ("tests/test_data_loader.py",),
    ),
    M(
        "padding-marked-valid",
        "data_pipeline/loaders/batch.py",
        "valid = torch.zeros(b, dtype=torch.bool)",
        "valid = torch.ones(b, dtype=torch.bool)",
        "evaluation padding rows are marked as real questions",
        ("tests/test_eval_official.py",),
    ),
    M(
        "convert-skip-out-of-vocab-ignored",
        "data_pipeline/convert/cli.py",
        "skip_out_of_vocab=args.skip_out_of_vocab,",
        "skip_out_of_vocab=False,",
        "--skip-out-of-vocab is ignored: questions with all-zero targets are kept",
        ("tests/test_data_convert.py",),
    ),
    # -- metric ----------------------------------------------------------------------------------------------------
    M(
        "punct-space-before-dropped",
        "data_pipeline/answers.py",
        'if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:',
        'if (p + " " in text) or _COMMA_STRIP.search(text) is not None:',
        "the official punctuation rule loses its ' ' + p case",
        ("tests/test_vqa_rules.py",),
    ),
    M(
        "identical-answers-case-dropped",
        "data_pipeline/answers.py",
        "    return len(set(texts)) <= 1",
        "    return False",
        "the 'all annotators gave the same answer' special case is dropped",
        ("tests/test_vqa_rules.py",),
    ),
    M(
        "rule-2021-always-normalises-prediction",
        "data_pipeline/answers.py",
        "return rule == VQA_2016 or not _annotators_agree(answers, rule)",
        "return True",
        "vqa-2021 normalises the prediction even where the annotators agree (the 2016 behaviour)",
        ("tests/test_vqa_rules.py",),
    ),
    M(
        "rule-2021-punctuation-only",
        "data_pipeline/answers.py",
        "tuple(_process_digit_article(_process_punctuation(a)) for a in cleaned)",
        "tuple(_process_punctuation(a) for a in cleaned)",
        "vqa-2021 processes the annotators' answers by punctuation only (the 2016 behaviour)",
        ("tests/test_vqa_rules.py",),
    ),
    M(
        "rule-2021-answers-not-stripped",
        "data_pipeline/answers.py",
        "cleaned = tuple(_clean_whitespace(a) for a in answers)",
        "cleaned = tuple(answers)",
        "vqa-2021 compares the annotators' answers with their stray white space",
        ("tests/test_vqa_rules.py",),
    ),
    M(
        "rule-2016-identical-processed",
        "data_pipeline/answers.py",
        "return tuple(answers) if agree else tuple(_process_punctuation(a) for a in answers)",
        "return tuple(_process_punctuation(a) for a in answers)",
        "vqa-2016 processes identical annotator answers too",
        ("tests/test_vqa_rules.py",),
    ),
    M(
        "articles-kept",
        "data_pipeline/answers.py",
        "words = [w for w in words if w not in ARTICLES]",
        "words = list(words)",
        "answer normalisation keeps 'a', 'an', 'the'",
        ("tests/test_data_answers.py",),
    ),
    M(
        "contractions-not-restored",
        "data_pipeline/answers.py",
        'return " ".join(CONTRACTIONS.get(w, w) for w in words)',
        'return " ".join(words)',
        "answer normalisation leaves 'dont' unrestored",
        ("tests/test_data_answers.py",),
    ),
    M(
        "soft-score-no-leave-one-out",
        "data_pipeline/answers.py",
        "total = matches * min(1.0, (matches - 1) / 3)",
        "total = matches * min(1.0, matches / 3)",
        "the soft score forgets to leave the annotator out (3 matches score 1.0, not 0.9)",
        ("tests/test_data_answers.py",),
    ),
    M(
        "targets-from-raw-answers",
        "data_pipeline/answers.py",
        "counts = Counter(normalize_answer(a) for a in answers)",
        "counts = Counter(answers)",
        "training targets count the raw spellings apart ('Two' and '2')",
        ("tests/test_data_answers.py",),
    ),
    M(
        "comparison-smaller-range",
        "trainer/tools/compare/results.py",
        "spread = max(max(a) - min(a), max(b) - min(b))",
        "spread = min(max(a) - min(a), max(b) - min(b))",
        "the comparison's verdict compares with the smaller seed range instead of the larger",
        ("tests/test_compare.py",),
    ),
    # -- losses ----------------------------------------------------------------------------------------------------
    M(
        "vqa-loss-averaged-over-answers",
        "trainer/modeling/losses.py",
        "F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype)) * targets.shape[1]",
        "F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))",
        "the VQA loss is averaged over answers instead of summed (ViLT's x n_answers)",
        ("tests/test_losses.py",),
    ),
    M(
        "infonce-temperature-multiplies",
        "trainer/modeling/losses.py",
        "logits = (z[rows] @ z.T) / temperature",
        "logits = (z[rows] @ z.T) * temperature",
        "InfoNCE multiplies by the temperature instead of dividing",
        ("tests/test_losses.py",),
    ),
    M(
        "infonce-anchor-in-denominator",
        "trainer/modeling/losses.py",
        '    own = F.one_hot(rows, z.shape[0]).bool()\n    logits = logits.masked_fill(own, float("-inf"))',
        "    own = F.one_hot(rows, z.shape[0]).bool()\n    logits = logits",
        "InfoNCE keeps the anchor itself in its own denominator",
        ("tests/test_losses.py",),
    ),
    M(
        "infonce-cosine-unnormalised",
        "trainer/modeling/losses.py",
        '    if similarity == "cosine":\n        z = F.normalize(z, dim=-1)',
        '    if similarity == "cosine":\n        z = z',
        "the cosine InfoNCE uses inner products",
        ("tests/test_losses.py",),
    ),
    M(
        "infonce-summed-over-anchors",
        "trainer/modeling/losses.py",
        "return _anchor_losses(z, rows, temperature, similarity, groups, duplicates).mean()",
        "return _anchor_losses(z, rows, temperature, similarity, groups, duplicates).sum()",
        "InfoNCE sums over anchors instead of averaging (scales with the batch)",
        ("tests/test_losses.py",),
    ),
    M(
        "contrastive-rank-offset-dropped",
        "trainer/modeling/losses.py",
        "local = torch.arange(m_local, device=all_i.device) + rank * m_local",
        "local = torch.arange(m_local, device=all_i.device)",
        "on every rank the contrastive anchors are rank 0's samples of the gathered batch",
        ("tests/test_losses.py",),
    ),
    M(
        "clip-loss-one-direction",
        "trainer/modeling/losses.py",
        "return (F.cross_entropy(logits_i, rows) + F.cross_entropy(logits_t, rows)) / 2",
        "return F.cross_entropy(logits_i, rows)",
        "CLIP's symmetric loss keeps only the image-to-text direction",
        ("tests/test_losses.py",),
    ),
)


# -- running -----------------------------------------------------------------------------------------------------
def repo_files(repo: Path) -> list[str]:
    """The repository's files: tracked, and untracked but not ignored (work in progress counts)."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    return sorted({p for p in out.decode().split("\0") if p and (repo / p).is_file()})


def copy_repo(repo: Path, dest: Path) -> None:
    for rel in repo_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def check_snippet(root: Path, m: Mutation) -> str | None:
    """None if the mutation's old snippet occurs exactly once in its file, else why not."""
    path = root / m.file
    if not path.is_file():
        return f"{m.file}: no such file"
    n = path.read_text().count(m.old)
    return None if n == 1 else f"{m.file}: the old snippet occurs {n} times (expected once)"


@dataclasses.dataclass
class Outcome:
    mutation: Mutation
    status: str  # killed | survived | error | timeout
    seconds: float
    detail: str


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    tail = [line for line in output.splitlines() if line.strip()]
    return tail[-1] if tail else ""


def _pytest(
    root: Path, where: list[str], python: str, timeout: float, env: dict[str, str]
) -> tuple[str, str]:
    cmd = [python, "-m", "pytest", "-m", "not slow", "-x", "-q", "-p", "no:cacheprovider", *where]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s"
    if proc.returncode == 0:
        return "passed", ""
    return "failed", _first_failure(proc.stdout + proc.stderr)


def run_tier(
    root: Path,
    first: tuple[str, ...],
    python: str,
    timeout: float,
    *,
    only_first: bool = False,
    mutation: str = "",
) -> tuple[str, float, str]:
    """Run the fast tier in `root`: the `first` test files on their own (a caught mutation stops there), then, if
    they pass and not `only_first`, the whole tier. (passed | failed | timeout, seconds, detail).

    `mutation` is exported as MUTATION_CHECK_APPLIED, so that tests/test_mutation_list.py does not count the one
    snippet that is meant to be missing from the copy."""
    env = {**os.environ, "PYTHONPATH": str(root), "MUTATION_CHECK_APPLIED": mutation}
    t0 = time.perf_counter()
    result, detail = _pytest(root, list(first), python, timeout, env) if first else ("passed", "")
    if result == "passed" and not only_first:
        result, detail = _pytest(root, ["tests"], python, max(1.0, timeout - (time.perf_counter() - t0)), env)
    return result, time.perf_counter() - t0, detail


def check_one(root: Path, m: Mutation, python: str, timeout: float, *, only_first: bool = False) -> Outcome:
    problem = check_snippet(root, m)
    if problem is not None:
        return Outcome(m, "error", 0.0, problem)
    path = root / m.file
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new))
    try:
        result, seconds, detail = run_tier(
            root, m.tests, python, timeout, only_first=only_first, mutation=m.name
        )
    finally:
        path.write_text(original)
    status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[result]
    return Outcome(m, status, seconds, detail)


def kill_rate(outcomes: list[Outcome]) -> float:
    """Caught (a failing test, or a tier that no longer ends) over the mutations that could be applied."""
    applied = [o for o in outcomes if o.status != "error"]
    return sum(o.status in ("killed", "timeout") for o in applied) / max(1, len(applied))


def machine() -> str:
    """Cores, CPU and Python, from the project's one machine description (read from this checkout, not the copy)."""
    sys.path.insert(0, str(REPO))
    try:
        from common.machine import machine as describe
    finally:
        sys.path.remove(str(REPO))
    m = describe()
    return f"{m['cores']} cores, {m['cpu']}; Python {m['python']}"


def report(outcomes: list[Outcome], command: str, baseline: float | None, wall: float) -> str:
    applied = [o for o in outcomes if o.status != "error"]
    caught = sum(o.status in ("killed", "timeout") for o in applied)
    lines = [
        "# Mutation check",
        "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}.",
        f"- Command: `{command}`",
        f"- Kill rate: {caught}/{len(applied)} = {100 * kill_rate(outcomes):.1f}%"
        f" ({len(outcomes) - len(applied)} mutations could not be applied); wall time {wall:.0f} s"
        + (f"; the unmutated fast tier passed in {baseline:.0f} s." if baseline is not None else "."),
        "",
        "| mutation | file | what it breaks | result | s | first failing test |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|")
        lines.append(
            f"| {o.mutation.name} | {o.mutation.file} | {o.mutation.description} | {o.status} | "
            f"{o.seconds:.0f} | {detail} |"
        )
    return "\n".join(lines) + "\n"


def select(only: list[str]) -> list[Mutation]:
    if not only:
        return list(MUTATIONS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: --only: unknown mutation(s) {', '.join(unknown)} (see --list)")
    return [known[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only", action="append", default=[], help="comma-separated mutation names (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds per mutation, its own tests and the tier together (default 600)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tier")
    parser.add_argument(
        "--own-tests-only",
        action="store_true",
        help="run only each mutation's own test files, not the whole fast tier (quick, while editing the list; a "
        "survivor there may still be caught by the tier)",
    )
    parser.add_argument(
        "--min-kill-rate", type=float, default=0.9, help="exit 1 below this rate (default 0.9)"
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        # absolute: pytest runs in the throwaway copy, where a path relative to here would name nothing
        type=lambda p: os.path.abspath(p) if os.sep in p else p,
        help="the interpreter that runs pytest",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        chosen = select(args.only)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name}\t{m.file}\t{m.description}")
        return 0

    # SIGTERM as Ctrl-C: the running pytest is killed and the temporary copy removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        root = Path(tmp) / "repo"
        copy_repo(REPO, root)
        baseline = None
        if not (args.no_baseline or args.own_tests_only):
            result, baseline, detail = run_tier(root, (), args.python, args.timeout)
            print(f"baseline: {result} in {baseline:.0f} s {detail}", flush=True)
            if result != "passed":
                print("error: the fast tier fails without any mutation; fix that first", file=sys.stderr)
                return 1
        outcomes = []
        for i, m in enumerate(chosen, 1):
            o = check_one(root, m, args.python, args.timeout, only_first=args.own_tests_only)
            outcomes.append(o)
            print(f"[{i}/{len(chosen)}] {m.name}: {o.status} ({o.seconds:.0f} s) {o.detail}", flush=True)
    command = "python scripts/mutation_check.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    text = report(outcomes, re.sub(r"\s+", " ", command), baseline, time.perf_counter() - t0)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    errors = any(o.status == "error" for o in outcomes)
    return 0 if not errors and kill_rate(outcomes) >= args.min_kill_rate else 1


if __name__ == "__main__":
    sys.exit(main())
