"""Shard folders in object storage (s3://), against a real S3-compatible server: moto's, started by the test.

The server runs in a child process on a free local port (`python -m moto.server`), never in this process: DALI's
S3 reads happen while DALI holds the GIL, so a server thread in the same interpreter would never answer them. Every
AWS setting points at it (AWS_ENDPOINT_URL, dummy credentials, no config files, no instance metadata), so nothing
leaves localhost. Skipped, with the reason, where moto (a dev dependency) is not installed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_data_loader import MEAN, STD, FakeTokenizer

from common.errors import BadInputError
from data_pipeline.convert import cli as convert
from data_pipeline.loaders import dali_loader
from data_pipeline.loaders.loader import (
    LoaderSpec,
    build_loader,
    read_answers,
    read_manifest,
    read_sample_info,
)
from data_pipeline.shards import integrity, sharding, storage, verify
from tests.helpers.synthetic_shards import convert_synthetic

pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
boto3 = pytest.importorskip("boto3")

BUCKET = "vqa-shards"
START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto server did not listen on port {port} within {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 server on localhost, with the process's AWS settings pointing at it for the module."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for a region or credentials
        "AWS_CONFIG_FILE": str(tmp_path_factory.mktemp("aws") / "config"),  # absent: no profile applies
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path_factory.mktemp("aws") / "credentials"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(proc, port)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_synthetic(tmp_path_factory.mktemp("remote"))


def _upload(folder: Path, prefix: str, skip: str = "", cut: dict[str, int] | None = None) -> str:
    client = boto3.client("s3")
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != skip:
            body = path.read_bytes()
            client.put_object(
                Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=body[: (cut or {}).get(path.name)]
            )
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def remote(endpoint: str, local: Path) -> str:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return _upload(local, "vqa/val")


def _load(folder: str | Path, kind: str, **kw) -> list[dict[str, torch.Tensor]]:
    args = dict(tokenizer=FakeTokenizer(), batch_size=4, image_size=48, mean=MEAN, std=STD, train=False)
    args.update(seed=0, num_workers=1, shuffle_buffer=8, kind=kind, device=torch.device("cpu"))
    args.update(kw)
    loader = build_loader(folder, LoaderSpec(**args))
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


def _assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_torch_loader_reads_s3_as_local(local: Path, remote: str) -> None:
    """Through webdataset's pipe: URLs (python -m data_pipeline.shards.storage cat): the same batches, both modes."""
    _assert_same(_load(local, "torch"), _load(remote, "torch"))
    _assert_same(_load(local, "torch", train=True, epoch=1), _load(remote, "torch", train=True, epoch=1))


@pytest.mark.skipif(not dali_loader.available(), reason="nvidia-dali is not installed")
def test_dali_reads_s3_as_local(local: Path, remote: str) -> None:
    """DALI's own S3 reader (tars and index files straight from s3://), in CPU mode: the same batches."""
    _assert_same(_load(local, "dali"), _load(remote, "dali"))
    _assert_same(_load(local, "dali", train=True, epoch=1), _load(remote, "dali", train=True, epoch=1))


def test_small_files_and_preflight_checks_read_s3(local: Path, remote: str) -> None:
    from trainer.main import check_data
    from trainer.tools.preflight.checks import read_first_samples

    assert read_manifest(remote) == read_manifest(local)
    assert read_answers(remote) == read_answers(local)
    assert read_sample_info(remote) == read_sample_info(local)
    assert check_data(remote, "val_data", 1, True, 48) == read_manifest(local)
    assert read_first_samples(remote, 0, 1) == read_first_samples(str(local), 0, 1)


def _one_line(exc: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def test_missing_bucket_object_or_scheme_is_one_line(local: Path, remote: str) -> None:
    with pytest.raises(BadInputError) as exc:
        read_manifest("s3://no-such-bucket/x")
    _one_line(exc, "s3://no-such-bucket/x", "no such bucket 'no-such-bucket'")
    with pytest.raises(sharding.DataError) as exc:
        build_loader(f"{remote}-missing", LoaderSpec(FakeTokenizer(), 4, 48, MEAN, STD, train=False))
    _one_line(exc, f"{remote}-missing", "manifest.json is missing")
    gappy = _upload(local, "vqa/gappy", skip="shard-000002.tar")
    with pytest.raises(sharding.DataError) as exc:
        sharding.open_folder(gappy)
    _one_line(exc, gappy, "shard-000002.tar is listed in manifest.json but missing")
    with pytest.raises(BadInputError) as exc:
        read_manifest("gs://bucket/folder")
    _one_line(exc, "gs://bucket/folder", "not supported")


def test_local_only_commands_refuse_s3_with_one_line(
    remote: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify.main([remote]) == 2
    assert convert.main(["subset", "--source", remote, "--count", "3", "--out", str(tmp_path / "s")]) == 2
    for line in capsys.readouterr().err.strip().splitlines():
        assert remote in line and "local folders only" in line, line


def test_storage_cat_and_unreachable_endpoint_are_one_line(
    remote: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = f"{remote}/no-such-shard.tar"
    run = subprocess.run(
        [sys.executable, "-m", "data_pipeline.shards.storage", "cat", missing],
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stdout == b""
    assert run.stderr.decode().strip().count("\n") == 0 and "no such object" in run.stderr.decode(), (
        run.stderr
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(BadInputError) as exc:
        read_manifest(remote)
    _one_line(exc, remote, "cannot reach", "AWS_ENDPOINT_URL")


def test_cut_short_object_fails_the_integrity_check(local: Path, remote: str) -> None:
    """The image byte checks are skipped in object storage; a cut-short upload is still named before DALI reads it."""
    size = (local / "shard-000001.tar").stat().st_size
    cut = _upload(local, "vqa/cut", cut={"shard-000001.tar": size // 2})
    with pytest.raises(sharding.DataError) as exc:  # opening the folder compares sizes with the manifest
        sharding.open_folder(cut)
    _one_line(exc, f"{cut}/shard-000001.tar", "cut short", "upload the folder again")
    # Cut short after the folder was opened (the object replaced mid-run): the loaders' own checks name it.
    folder = sharding.open_folder(_upload(local, "vqa/cut", cut={}))
    _upload(local, "vqa/cut", cut={"shard-000001.tar": size // 2})
    integrity.check_shard(folder.shards[0])  # whole
    with pytest.raises(sharding.DataError) as exc:
        integrity.check_shard(folder.shards[1])
    _one_line(exc, f"{cut}/shard-000001.tar", "truncated", "upload the folder again")
    with pytest.raises(sharding.DataError) as exc:
        list(sharding.iter_sample_json(folder))
    _one_line(exc, f"{cut}/shard-000001.tar", "truncated")


def test_locations() -> None:
    assert storage.location("s3://b/p/") == storage.ObjectPath("s3://b/p")
    assert str(storage.location("s3://b/p") / "x.tar") == "s3://b/p/x.tar"
    assert storage.location("file:///tmp/x") == Path("/tmp/x") and storage.location("rel/dir") == Path(
        "rel/dir"
    )
    obj = storage.ObjectPath("s3://bucket/a/b.tar")
    assert (obj.bucket, obj.key, obj.name) == ("bucket", "a/b.tar", "b.tar")
    url = storage.pipe_url("s3://b/k.tar")
    assert url.startswith("pipe:") and url.endswith("-m data_pipeline.shards.storage cat s3://b/k.tar")


def test_torch_loader_names_a_shard_that_vanished(
    local: Path, remote: str, capfd: pytest.CaptureFixture
) -> None:
    """A tar that cannot be streamed (deleted after the folder was opened): one DataError naming it."""
    gone = _upload(local, "vqa/vanishing")
    loader = build_loader(
        gone, LoaderSpec(FakeTokenizer(), 4, 48, MEAN, STD, train=False, kind="torch", num_workers=0)
    )
    boto3.client("s3").delete_object(Bucket=BUCKET, Key="vqa/vanishing/shard-000000.tar")
    with pytest.raises(sharding.DataError) as exc:
        list(loader)
    _one_line(exc, f"{gone}/shard-000000.tar", "could not be read", "AWS_")
    assert "no such object" in capfd.readouterr().err  # the storage's own line, from the pipe's command
