"""The comparison's runs side by side (trainer/tools/compare/schedule.py, runs.run_all): the plan of slots on CPUs
and GPUs, the environment each run gets, failures and progress, and (slow) that --jobs changes no number."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from trainer.tools.compare import runs as runs_mod
from trainer.tools.compare.cli import build_parser, main
from trainer.tools.compare.results import CompareError, summarise_run
from trainer.tools.compare.runs import Progress, RunSpec, Stopped, full_eval_command, run_all, trainer_command
from trainer.tools.compare.schedule import THREAD_VARS, ScheduleError, oversubscribed, parse_jobs, plan
from trainer.tools.compare.variants import parse_variant


def test_cpu_plan_is_one_single_threaded_run_per_core():
    slots = plan(None, 4, gpus_per_run=0, local_gpus=0, cpus=2)
    assert [(s.index, s.threads, s.gpus, s.port) for s in slots] == [(0, 1, (), None), (1, 1, (), None)]
    assert not oversubscribed(slots, 2)
    env = slots[1].env({"PATH": "/bin", "OMP_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "3"})
    assert all(env[var] == "1" for var in THREAD_VARS) and env["PATH"] == "/bin"
    assert (
        env["CUDA_VISIBLE_DEVICES"] == "3" and "MASTER_PORT" not in env
    )  # a CPU run picks a free port itself
    # Never more slots than runs; --threads-per-run T: one run per T cores; --jobs beyond the cores is allowed
    # (the numbers stay the same) and said to be oversubscribed.
    assert len(plan(None, 1, gpus_per_run=0, local_gpus=0, cpus=16)) == 1
    wide = plan(None, 8, gpus_per_run=0, local_gpus=0, cpus=16, threads_per_run=4)
    assert [s.threads for s in wide] == [4] * 4 and wide[0].env({})["MKL_NUM_THREADS"] == "4"
    assert len(plan(1, 4, gpus_per_run=0, local_gpus=0, cpus=2)) == 1
    three = plan(3, 4, gpus_per_run=0, local_gpus=0, cpus=2)
    assert len(three) == 3 and oversubscribed(three, 2)


def test_gpu_plan_gives_each_run_its_devices_and_port():
    """8 GPUs, 1 and 2 per run: disjoint CUDA_VISIBLE_DEVICES, distinct rendezvous ports, and deepspeed launched
    without --num_gpus (which would make it ignore CUDA_VISIBLE_DEVICES and put every run on GPU 0)."""
    one = plan(None, 20, gpus_per_run=1, local_gpus=8, cpus=16, base_port=29512)
    assert [s.gpus for s in one] == [(i,) for i in range(8)]
    assert [s.port for s in one] == list(range(29512, 29520))
    assert [s.env({})["CUDA_VISIBLE_DEVICES"] for s in one] == [str(i) for i in range(8)]
    assert [s.env({})["MASTER_PORT"] for s in one] == [str(p) for p in range(29512, 29520)]
    two = plan(None, 20, gpus_per_run=2, local_gpus=8, cpus=16, base_port=30000)
    assert [s.env({})["CUDA_VISIBLE_DEVICES"] for s in two] == ["0,1", "2,3", "4,5", "6,7"]
    assert [s.port for s in two] == [30000, 30001, 30002, 30003]
    # Under a CUDA_VISIBLE_DEVICES already set (Slurm's GPUs of the job), the slot's GPUs are among those listed.
    assert two[1].env({"CUDA_VISIBLE_DEVICES": "8,9,10,11,12,13,14,15"})["CUDA_VISIBLE_DEVICES"] == "10,11"
    assert len(plan(None, 3, gpus_per_run=2, local_gpus=8, cpus=16)) == 3  # no idle slot
    assert len(plan(2, 20, gpus_per_run=2, local_gpus=8, cpus=16)) == 2

    args = build_parser().parse_args(["--train-data", "T", "--val-data", "V", "--gpus-per-run", "2"])
    spec = RunSpec(parse_variant("clip-infonce-dot"), 0, runs_mod.REPO / "runs" / "x")
    for cmd in (trainer_command(spec, args, False, two[3]), full_eval_command(spec, args, two[3])):
        assert cmd[0].endswith("deepspeed") and cmd[1:3] == ["--master_port", "30003"]
        assert "--num_gpus" not in cmd and cmd[3].endswith("trainer/main.py")
    cpu = plan(None, 2, gpus_per_run=0, local_gpus=8, cpus=2)[0]
    assert trainer_command(spec, args, False, cpu)[1].endswith("trainer/main.py")  # a plain python process

    with pytest.raises(ScheduleError, match="--jobs 5 with --gpus-per-run 2 needs 10 GPUs; this host has 8"):
        plan(5, 20, gpus_per_run=2, local_gpus=8, cpus=16)
    with pytest.raises(ScheduleError, match="--gpus-per-run 16: this host has 8"):
        plan(None, 20, gpus_per_run=16, local_gpus=8, cpus=16)


def test_jobs_option_and_bad_values(tmp_path, capsys):
    assert parse_jobs("auto") is None and parse_jobs("3") == 3
    base = ["--train-data", str(tmp_path), "--val-data", str(tmp_path)]
    for extra, message in (
        (["--jobs", "0"], "--jobs must be auto or a number >= 1, got 0"),
        (["--jobs", "many"], "--jobs must be auto or a number >= 1, got 'many'"),
        (["--threads-per-run", "0"], "--threads-per-run must be >= 1, got 0"),
        (["--only", "clip-infonce-dot+dup-mask"], "--only clip-infonce-dot+dup-mask: not among --variants"),
        (["--only", "baseline", "--report-only"], "--only runs cells; --report-only gathers them"),
    ):
        (tmp_path / "manifest.json").write_text("{}")
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("compare: error: ") and message in err and err.count("\n") == 1, err


def _specs(tmp_path, n):
    names = ["baseline", "clip-no-infonce", "clip-infonce-cos", "clip-infonce-dot"]
    return [RunSpec(parse_variant(names[i % 4]), i // 4, tmp_path / f"r{i}") for i in range(n)]


def test_runs_go_side_by_side_each_in_its_own_slot_and_a_failure_stops_no_other(
    tmp_path, monkeypatch, capsys
):
    slots = plan(2, 5, gpus_per_run=1, local_gpus=2, cpus=2)
    busy: set[int] = set()
    seen: list[tuple[str, int]] = []
    peak = [0]
    lock = threading.Lock()

    def fake_run_one(spec, args, slot):
        with lock:
            assert slot.index not in busy, "two runs in one slot"
            busy.add(slot.index)
            peak[0] = max(peak[0], len(busy))
            seen.append((spec.run_dir.name, slot.index))
        time.sleep(0.05)
        with lock:
            busy.discard(slot.index)
        if spec.run_dir.name == "r1":
            raise CompareError(
                f"{spec.variant.name} seed 0 failed (exit 1); log: {spec.run_dir / 'train.log'}"
            )
        return True

    monkeypatch.setattr(runs_mod, "run_one", fake_run_one)
    args = build_parser().parse_args(["--train-data", "T", "--val-data", "V"])
    args.subset_dir = None
    failures = run_all(_specs(tmp_path, 5), args, slots)
    assert sorted(name for name, _ in seen) == [f"r{i}" for i in range(5)]  # the failure stopped no other run
    assert peak[0] == 2
    assert failures == [f"clip-no-infonce seed 0 failed (exit 1); log: {tmp_path / 'r1' / 'train.log'}"]
    lines = [line for line in capsys.readouterr().out.splitlines() if "runs," in line]
    assert len(lines) == 5  # one line per finished run, each with the overall bar
    assert any("clip-no-infonce seed 0: FAILED" in line and "train.log" in line for line in lines)
    assert lines[-1].endswith("all done") and "[####################] 5/5 runs" in lines[-1]
    assert "ETA" in lines[0]


def _compare(shards, out, jobs):
    argv = [
        "--preset", "tiny",
        "--train-data", str(shards / "train"),
        "--val-data", str(shards / "test"),
        "--run-dir", str(out),
        "--variants", "baseline,clip-infonce-dot",
        "--steps", "6",
        "--val-subset", "16",
        "--val-every", "3",
        "--set", "train.log_every=1",
        "--set", "train.progress_bar=false",
        "--jobs", str(jobs),
        "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_jobs_change_no_number(tiny_easyvqa_shards, tmp_path):
    """The same comparison one run at a time and two side by side: every score and every logged curve point is the
    same to the last digit (each run has one intra-op thread either way)."""
    one, two = (
        _compare(tiny_easyvqa_shards, tmp_path / "j1", 1),
        _compare(tiny_easyvqa_shards, tmp_path / "j2", 2),
    )
    assert (one["jobs"], two["jobs"], one["threads_per_run"], two["threads_per_run"]) == (1, 2, 1, 1)
    for variant in ("baseline", "clip-infonce-dot"):
        a = summarise_run(tmp_path / "j1" / f"{variant}-seed0", [2.0, 1.5, 1.0], 4, full_eval=True)
        b = summarise_run(tmp_path / "j2" / f"{variant}-seed0", [2.0, 1.5, 1.0], 4, full_eval=True)
        assert len(a["curves"]["vqa_loss"]) == 6 and a["curves"]["val_step"] == [3, 6]
        for key in (
            "curves",
            "full_val_vqa_score",
            "final_val_vqa_score",
            "steps_to_loss_below",
            "loss_noise",
        ):
            assert a[key] == b[key], (variant, key)
        done = json.loads((tmp_path / "j2" / f"{variant}-seed0" / "run_complete.json").read_text())
        assert (done["threads"], done["gpus"]) == (1, 0)


def test_sigterm_stops_the_running_trainers_and_starts_no_other(tmp_path, monkeypatch, capsys):
    """A SIGTERM to the comparison alone (a batch system's notice) reaches its running trainers, which save and exit
    143; no further run starts, and Stopped says which signal (the CLI exits 128 + it)."""
    trainer = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(
        runs_mod, "trainer_command", lambda spec, args, resume, slot: [sys.executable, "-c", trainer]
    )
    args = build_parser().parse_args(["--train-data", "T", "--val-data", "V", "--quiet"])
    args.subset_dir = None
    specs = _specs(tmp_path, 3)
    slots = plan(2, 3, gpus_per_run=0, local_gpus=0, cpus=2)

    def term_once_both_started():
        deadline = time.time() + 30
        while time.time() < deadline:
            logs = [s.run_dir / "train.log" for s in specs[:2]]
            if all(p.is_file() and "started" in p.read_text() for p in logs):
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=term_once_both_started, daemon=True).start()
    with pytest.raises(Stopped) as stopped:
        run_all(specs, args, slots)
    assert stopped.value.signum == signal.SIGTERM
    assert not specs[2].run_dir.exists()  # the third run never started
    assert not any((s.run_dir / "run_complete.json").exists() for s in specs)
    out = capsys.readouterr().out
    assert out.count("stopped; the same command continues it") == 2 and "FAILED" not in out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again


def test_eta_shares_the_work_left_among_the_slots():
    """Two slots, four runs: the first run done after 100 s while the second has run as long leaves two waiting runs
    and nothing of the second, at 100 s each over two slots: 100 s, not the 300 s of runs-left x time-per-run."""
    progress = Progress(total=4, kept=0, slots=2)
    now = time.time()
    progress.start = now - 100
    progress.running = {"a": now - 100, "b": now - 100}
    line = progress.line("a", "done in 1m40s")
    assert line.endswith("[#####---------------] 1/4 runs, 1m40s, ETA 1m40s"), line
    assert Progress(total=3, kept=2, slots=1).line("c", "done").endswith("3/3 runs, 0m00s, all done")
