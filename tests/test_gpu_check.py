"""scripts/gpu_check.sh on the CPU: its options, its plan (the stages' order, the shard folder's size, every command
accepted by its tool), its refusal without a GPU, the training smoke's plumbing (shards, a run killed with kill -9
after its half-way checkpoint, the resumed run, the verdict file) at the tiny preset, the summary's goal verdicts and
the archive's size limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "VQA_PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def test_help_and_bad_options() -> None:
    out = run("--help")
    assert out.returncode == 0 and "--budget" in out.stdout and "--stages" in out.stdout
    bad = run("--stages", "tests,nonsense")
    assert bad.returncode == 2 and "unknown stage 'nonsense'" in bad.stderr
    assert run("--steps", "6").returncode == 2  # too few steps for checkpoint, kill and resume
    assert run("--budget", "zero").returncode == 2


def summary_module():
    """scripts/gpu_check_summary.py, imported as the script runs it (scripts/ is not a package)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check_summary
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return gpu_check_summary


def plan(*args: str) -> tuple[list[str], list[list[str]]]:
    """`--plan`: its comment lines, and one (name, least s, most s, command) per stage in the order they run."""
    out = run("--plan", *args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return [x for x in lines if x.startswith("#")], [x.split("\t") for x in lines if not x.startswith("#")]


def test_the_plan_runs_the_questions_first_and_writes_nothing(tmp_path: Path) -> None:
    notes, stages = plan("--out", str(tmp_path / "r"))
    assert [s[0] for s in stages] == [
        "shards",
        # the first size: the engine, end to end and plain; the host-worker loader; transformers' ViLT
        "bench_384px", "bench_384px_host_workers", "hf_vilt_384px",
        "bench_224px",
        "loaders", "loaders_dali_hw_load", "loaders_dali_threads", "loaders_dali_prefetch",
        "smoke_first", "smoke", "tests", "zero2", "zero1", "ranks",
    ]  # fmt: skip
    assert not (tmp_path / "r").exists()
    # The shard folder holds more batches than a timed cell reads, and no whole number of them: no loader epoch
    # ends inside a cell's windows or its profile (4,608 samples = 18 batches once did).
    assert notes[0] == "# budget 480 s; shard folder: 6016 samples, 23 batches of 256, a timed cell reads 21"
    _, small = plan("--batch", "32", "--stages", "loaders")
    assert [s[0] for s in small][:2] == ["shards", "loaders"]
    assert all(int(lo) <= int(hi) for _, lo, hi, _ in stages)


def test_every_command_of_the_plan_is_accepted_by_its_tool() -> None:
    """The plan's bench and loader commands, through the tools' own argument checks (nothing runs)."""
    from data_pipeline.tools.bench import build_parser as loaders_parser
    from trainer.tools.bench.cli import build_parser as bench_parser
    from trainer.tools.bench.cli import resolve_args

    _, stages = plan()
    seen = set()
    for name, _, _, command in stages:
        words = command.split()
        if words[0] == "bench":  # the script's bench(): these options come first
            argv = ["--preset", "vqa2-base", "--batch-size", "256", "--variants", "clip-infonce-dot"]
            argv += ["--train-data", "d", "--set", "model.compile=true", *words[1:]]
            resolve_args(bench_parser().parse_args(argv))
            seen.add("bench")
        elif words[1:3] == ["-m", "data_pipeline.tools.bench"]:
            args = loaders_parser().parse_args(words[3:])
            seen.add("loaders")
            if name != "loaders":  # one DALI setting at a time, two values each
                assert args.kinds == ["dali"] and args.sizes == [384], name
                swept = [len(args.workers), len(args.hw_decoder_load), len(args.prefetch)]
                assert sorted(swept) == [1, 1, 2], name
    assert seen == {"bench", "loaders"}


def test_the_archive_leaves_out_the_largest_files_past_its_limit(tmp_path: Path) -> None:
    gpu_check_summary = summary_module()
    out = tmp_path / "check"
    (out / "profiles").mkdir(parents=True)
    (out / "summary.txt").write_text("summary\n")
    (out / "bench_384px.json").write_text('{"results": []}\n')
    (out / "profiles" / "big.txt").write_bytes(os.urandom(3 * 2**20))  # incompressible
    (out / "profiles" / "small.txt").write_bytes(os.urandom(2**19))
    archive = tmp_path / "check.tar.gz"
    assert gpu_check_summary.write_archive(out, archive, 1) == [out / "profiles" / "big.txt"]
    assert archive.stat().st_size <= 2**20
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        omitted = tar.extractfile("check/archive_omitted.txt").read().decode()
    assert names == {
        "check/summary.txt", "check/bench_384px.json", "check/profiles/small.txt", "check/archive_omitted.txt"
    }  # fmt: skip
    assert omitted == f"{3 * 2**20}\tprofiles/big.txt\n"
    assert gpu_check_summary.write_archive(out, archive, 60) == []  # all of it fits in 60 MiB


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU"
)
def test_refuses_without_a_gpu_unless_asked(tmp_path: Path) -> None:
    out = run("--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "torch sees no CUDA GPU" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing written before the refusal


@pytest.mark.slow
@pytest.mark.timeout(900)  # the smoke stage's own budget is 500 s
def test_smoke_stage_kills_resumes_and_judges(tmp_path: Path) -> None:
    out_dir = tmp_path / "check"
    out = run(
        # 24 steps of 32 samples: after the checkpoint at step 12 the run has ~10 steps left in which the watcher
        # must see step 14 logged and kill it (a run that ends first fails the smoke, as it should).
        "--allow-cpu", "--no-compile", "--stages", "smoke,ranks", "--preset", "tiny", "--sizes", "32", "--batch", "32",
        "--samples", "256", "--steps", "24", "--workers", "1", "--budget", "500", "--out", str(out_dir),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    stages = (out_dir / "stages.tsv").read_text().splitlines()
    status = dict(line.split("\t")[:2] for line in stages[1:])
    assert status == {"shards": "ok", "smoke_first": "ok", "smoke": "ok", "ranks": "skipped"}, stages
    # The multi-rank bench (`python -m trainer.tools.bench --ranks N`) runs only where there are 2 or more GPUs.
    assert stages[-1].split("\t")[3] == "0 GPU(s): needs 2 or more"
    assert "ranks: skipped, 0 GPU(s) here" in out.stderr
    first = (out_dir / "smoke" / "first.log").read_text()
    assert "killed (kill -9) after step 14 was logged" in first
    verdict = json.loads((out_dir / "smoke" / "smoke.json").read_text())
    assert verdict["resumed_from_step"] == 12 and verdict["first_run_killed_after_step"] == 14
    assert (
        verdict["loss_falls"]
        and verdict["resumed_continues_curve"]
        and verdict["resumed_starts_after_checkpoint"]
    )
    # On the CPU the resumed run repeats the killed run's steps exactly (same data order, same weights).
    assert all(gap < 1e-4 for gap in verdict["relative_difference_at_common_steps"].values())
    # Step 12 is mid-epoch (8 batches an epoch): the resumed run restored DALI's own checkpoint.
    assert not verdict["dali_gpu"] and verdict["dali_state_restored"]
    assert not (out_dir / "data").exists()  # the shards (gigabytes at the real size) are removed at the end
    assert "smoke: loss_falls True" in (out_dir / "summary.txt").read_text()
    # Everything in one archive beside the folder, the summary and the verdict included.
    with tarfile.open(f"{out_dir}.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"check/summary.txt", "check/stages.tsv", "check/smoke/smoke.json"} <= names
    assert "check/archive_omitted.txt" not in names  # far under the 60 MiB limit


def test_the_summary_gives_each_goal_its_figures_and_verdict(tmp_path: Path) -> None:
    gpu_check_summary = summary_module()

    def row(
        mode: str,
        rate: float,
        wait: float = 0.0,
        busy: float | None = None,
        variant: str = "clip-infonce-dot",
    ):
        wall = 256 / rate
        profile = None if busy is None else {"wall_s_per_step": wall, "device_busy_s_per_step": busy}
        return {
            "variant": variant, "image_size": 384, "mode": mode, "engine": "e", "samples_per_s": rate, "mfu": 0.4,
            "data_wait_fraction": wait, "first_step_s": 1.0, "epoch_restarts": 0, "profile": profile,
        }  # fmt: skip

    out = tmp_path / "check"
    out.mkdir()
    (out / "machine.txt").write_text("name, memory.total\nNVIDIA H100 80GB HBM3, 81559 MiB\n")
    # synthetic: 0.128 s a step, 0.120 busy (8 ms idle); shards: 0.1333 s, 0.120 busy (13.3 ms idle: 5.3 ms more).
    cells = [row("synthetic", 2000, busy=0.120), row("shards", 1920, 0.01, busy=0.120), row("plain", 2050)]
    (out / "bench_384px.json").write_text(json.dumps({"results": cells}))
    hf = [row("plain", 900, variant="transformers-vilt")]
    (out / "hf_vilt_384px.json").write_text(json.dumps({"results": hf}))
    text = gpu_check_summary.summary(out, 384)
    goals = text.split("goals (H100):\n")[1].split("\n\n")[0].splitlines()
    assert [g.strip() for g in goals] == [
        "384 px end to end: 1920.0 samples/s against transformers' ViLT 900.0: 2.13x (goal >= 2x): met",
        "384 px end to end: 1920.0 samples/s (goal on an H100 >= 1900): met",
        "384 px end to end: data wait 1.0% of the step (goal < 2%): met",
        "384 px end to end: the loader's host work in the step (profiled GPU idle time beyond the engine's own) "
        "4.0% of the step (goal < 2%): MISSED",
        "384 px engine (batches on the GPU) 2000.0 against plain PyTorch 2050.0 samples/s: 2.4% slower "
        "(goal: at most 5% slower): met",
    ]
