"""Damaged data through the real entry points: every failure is a prompt exit with one line naming the file.

Each trainer run is a subprocess with a timeout, so that a hang or a crash fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_pipeline.shards import format as shards
from tests.helpers.launch_env import running_in_group

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # a healthy failing run takes ~5-10 s on 2 cores; a hang must not stall the suite


def trainer(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--preset", "tiny", *argv]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The run exited 2 with exactly one `error:` line (no traceback) containing every needle."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), errors
    return errors[0]


def with_tokenizer(run_dir: Path, data: Path) -> Path:
    """A run folder that already holds the tiny preset's question tokenizer (built from healthy data)."""
    from data_pipeline.shards.sharding import iter_sample_json, open_folder
    from data_pipeline.text import QuestionTokenizer
    from trainer.config.presets import get_preset

    m = get_preset("tiny").model
    QuestionTokenizer.build(
        [s["question"] for s in iter_sample_json(open_folder(data))],
        run_dir / "tokenizer",
        clip_arch=m.clip_arch,
        max_text_len=m.max_text_len,
        clip_context_length=m.clip_context_length,
        vocab_size=m.wordpiece_vocab_size,
        fit_clip_vocab=m.clip_text_vocab == "compact" and m.contrastive != "none",
    )
    return run_dir


def truncated_copy(folder: Path, dest: Path, shard: str = "shard-000001.tar") -> Path:
    """A copy of a shard folder with one tar cut in half (its index kept), as after an interrupted copy."""
    shutil.copytree(folder, dest)
    tar = dest / shard
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    return dest


def damaged_header_copy(folder: Path, dest: Path, shard: str = "shard-000000.tar") -> tuple[Path, int]:
    """A copy whose tar has one member header, mid-shard, overwritten (sizes and index unchanged); returns the
    number of samples before it."""
    shutil.copytree(folder, dest)
    tar = dest / shard
    with tarfile.open(tar) as t:
        members = t.getmembers()
    victim = members[len(members) // 2 // 2 * 2]  # a sample's first member (each sample: jpg then json)
    data = bytearray(tar.read_bytes())
    data[victim.offset : victim.offset + tarfile.BLOCKSIZE] = b"\x55" * tarfile.BLOCKSIZE
    tar.write_bytes(bytes(data))
    return dest, members.index(victim) // 2


def corrupt_image_copy(folder: Path, dest: Path) -> str:
    """A copy with the first 200 bytes of one image overwritten; returns the damaged sample's key."""
    shutil.copytree(folder, dest)
    tar = dest / "shard-000000.tar"
    offset, _ = shards.read_index(dest / "shard-000000.idx")[2]["jpg"]
    data = bytearray(tar.read_bytes())
    data[offset : offset + 200] = bytes(200)
    tar.write_bytes(bytes(data))
    return shards.read_index_keys(dest / "shard-000000.idx")[2]


def run_in_own_group(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `cmd` as the leader of a process group of its own; fail unless the process itself exits within TIMEOUT_S
    and leaves no process of its group running. The deadline is the process's own exit, not the end of its output:
    a worker left behind holding the output pipes open must not decide when the test looks."""
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
    try:
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the trainer did not exit within {TIMEOUT_S} s:\n{err_path.read_text()[-3000:]}")
        left = running_in_group(proc.pid)
        assert not left, f"processes {left} of the trainer (its loader workers) outlive it"
    finally:
        if running_in_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # trainer and workers
        proc.wait(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out_path.read_text(), err_path.read_text())


# The trainer script with a fault injected into every loader worker: its third batch raises. Not a DataError (a
# one-line exit 2) but any exception: it leaves the program, and its traceback (kept as sys.last_traceback) keeps
# the DataLoader iterator alive while the interpreter exits.
FAULTY_WORKER_TRAINER = """
import runpy, sys
from data_pipeline.loaders import torch_loader
batch, calls = torch_loader._EpochBlocks._batch, [0]
def faulty(self, rows):
    calls[0] += 1
    if calls[0] > 2:
        raise RuntimeError("fault injected into a loader worker")
    return batch(self, rows)
torch_loader._EpochBlocks._batch = faulty
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("error", ["damaged shard", "any exception"])
def test_the_trainer_process_exits_after_a_loader_error_and_leaves_no_worker(
    error: str, tiny_easyvqa_shards: Path, tmp_path: Path
) -> None:
    """A hang regression. The loader's workers block SIGTERM, so multiprocessing's exit handler (terminate, then join)
    would wait for them forever unless the loader stops them itself: after a damaged shard (a one-line error, exit
    2) and after any other exception in a worker (a traceback, exit 1), the trainer process exits and leaves no
    worker running."""
    train = tiny_easyvqa_shards / "train"
    if error == "damaged shard":  # sizes unchanged, so it passes the start-up check and fails inside a worker
        train, _ = damaged_header_copy(train, tmp_path / "broken", "shard-000001.tar")
    run = with_tokenizer(tmp_path / "run", tiny_easyvqa_shards / "train")
    args = [
        str(REPO / "trainer" / "main.py"),
        "--preset",
        "tiny",
        "--train-data",
        str(train),
        "--run-dir",
        str(run),
    ]
    args += ["--max-steps", "20", "--set", "data.loader=torch", "--set", "data.num_workers=2"]
    if error == "damaged shard":
        result = run_in_own_group([sys.executable, *args], tmp_path)
        one_error_line(result, str(train / "shard-000001.tar"), "samples lost")
    else:
        result = run_in_own_group([sys.executable, "-c", FAULTY_WORKER_TRAINER, *args], tmp_path)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "fault injected into a loader worker" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_truncated_shard_in_the_tokenizer_build_is_one_line(
    tiny_easyvqa_shards: Path, tmp_path: Path
) -> None:
    broken = truncated_copy(tiny_easyvqa_shards / "train", tmp_path / "broken")
    result = trainer("--train-data", str(broken), "--run-dir", str(tmp_path / "run"), "--max-steps", "1")
    one_error_line(result, str(broken / "shard-000001.tar"), "truncated")


@pytest.mark.slow
def test_dali_corrupt_image_in_evaluation_is_one_line_not_a_crash(
    tiny_easyvqa_shards: Path, tmp_path: Path
) -> None:
    """A padded evaluation batch (256 > 32 samples) holds the damaged image several times: DALI's CPU decoder
    crashed the process on it (exit 139); the loader now finds it before DALI decodes anything."""
    val = tmp_path / "val"
    key = corrupt_image_copy(tiny_easyvqa_shards / "test", val)
    result = trainer(
        "--train-data", str(tiny_easyvqa_shards / "train"), "--val-data", str(val), "--run-dir",
        str(tmp_path / "run"), "--eval-only", "--resume", "none", "--set", "train.eval_batch_size=256",
        "--set", "data.loader=dali",
    )  # fmt: skip
    one_error_line(result, str(val / "shard-000000.tar"), f"sample {key}", "damaged image")


@pytest.mark.slow
def test_damaged_tar_header_is_an_error_not_a_silent_loss(tiny_easyvqa_shards: Path, tmp_path: Path) -> None:
    broken, before = damaged_header_copy(tiny_easyvqa_shards / "train", tmp_path / "broken")
    run = with_tokenizer(tmp_path / "run", tiny_easyvqa_shards / "train")
    result = trainer(
        "--train-data", str(broken), "--run-dir", str(run), "--max-steps", "8", "--set", "data.loader=torch"
    )
    line = one_error_line(result, str(broken / "shard-000000.tar"), "samples lost")
    assert f"ends after sample {before} of the 64" in line and f"{64 - before} samples lost" in line


@pytest.mark.slow
def test_short_shard_can_be_a_warning_through_the_config(tiny_easyvqa_shards: Path, tmp_path: Path) -> None:
    broken, before = damaged_header_copy(tiny_easyvqa_shards / "train", tmp_path / "broken")
    run = with_tokenizer(tmp_path / "run", tiny_easyvqa_shards / "train")
    result = trainer(
        "--train-data", str(broken), "--run-dir", str(run), "--max-steps", "2", "--set", "data.loader=torch",
        "--set", "data.on_short_shard=warn", "--set", "train.progress_bar=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{64 - before} samples lost" in result.stderr
    bad = trainer("--train-data", str(broken), "--run-dir", str(run), "--set", "data.on_short_shard=ignore")
    one_error_line(bad, "data.on_short_shard: 'ignore' is not one of error, warn")


def test_any_exception_inside_the_loader_exits_without_waiting_for_its_workers(
    tiny_easyvqa_shards: Path,
) -> None:
    """Not only bad data: any exception raised in a worker (here the tokenizer's) propagates out of the program
    with a traceback that keeps the DataLoader iterator alive; the workers (SIGTERM blocked by `shielded`) must
    still be stopped, or the interpreter waits for them forever at exit."""
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / "tests")!r})
from test_data_loader import MEAN, STD, BrokenTokenizer
from data_pipeline.loaders.loader import LoaderSpec, build_loader
from trainer.run.preemption import shielded
loader = build_loader({str(tiny_easyvqa_shards / "train")!r}, LoaderSpec(tokenizer=BrokenTokenizer(), batch_size=4,
    image_size=32, mean=MEAN, std=STD, rank=0, world_size=1, train=True, seed=0, kind="torch", num_workers=2))
for batch in shielded(loader):
    pass
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "tokenizer exploded" in result.stderr, result.stderr[-2000:]


def _main(*argv: str) -> int:
    from trainer import main

    return main.main(list(argv))


def test_malformed_answers_json_is_one_line(tiny_easyvqa_shards: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "data"
    shutil.copytree(tiny_easyvqa_shards / "train", folder)
    (folder / "answers.json").write_text('["circle", ')
    assert _main("--train-data", str(folder), "--run-dir", str(tmp_path / "run"), "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert str(folder / "answers.json") in err and "not valid JSON" in err


def test_manifest_shard_without_samples_is_one_line(
    tiny_easyvqa_shards: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "data"
    shutil.copytree(tiny_easyvqa_shards / "train", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["shards"][1]["samples"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert _main("--train-data", str(folder), "--run-dir", str(tmp_path / "run"), "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json: shards[1]: missing field 'samples'" in err, err


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_shard_cut_short_is_one_line_from_build_loader(
    tiny_easyvqa_shards: Path, tmp_path: Path, kind
) -> None:
    from test_data_loader import MEAN, STD, FakeTokenizer

    from data_pipeline.loaders.loader import DataError, LoaderSpec, build_loader

    broken = truncated_copy(tiny_easyvqa_shards / "test", tmp_path / "broken", "shard-000000.tar")
    kw = dict(
        tokenizer=FakeTokenizer(), batch_size=4, image_size=32, mean=MEAN, std=STD, rank=0, world_size=1
    )
    with pytest.raises(DataError, match="shard-000000.tar: ") as info:
        list(build_loader(broken, LoaderSpec(train=False, seed=0, kind=kind, num_workers=2, **kw)))
    assert len(str(info.value).splitlines()) == 1
