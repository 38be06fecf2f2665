"""`python -m data_pipeline.shards.verify`: an intact folder passes; bit rot, a cut-short copy, a stale or missing index are
named. The trainer's start-up check compares shard sizes with the manifest and names the command when they differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipeline.shards import format as shards
from data_pipeline.shards import verify
from tests.helpers.synthetic_shards import convert_synthetic


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    return convert_synthetic(root, shard_size=8, bad=False, sizes=(64, 96, 48, 80), photo_like=True)


def copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_intact_folder_passes_and_the_manifest_holds_digests(folder: Path, capsys) -> None:
    entries = json.loads((folder / "manifest.json").read_text())["shards"]
    assert all(len(e["sha256"]) == 64 and len(e["index_sha256"]) == 64 for e in entries)
    assert entries[0]["sha256"] == shards.file_sha256(folder / entries[0]["tar"])
    assert verify.main([str(folder), "--no-progress", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "checked sizes, digests, index, every image decoded: intact" in out


def test_bit_rot_inside_an_image_is_found(folder: Path, tmp_path: Path, capsys) -> None:
    """One byte flipped in a JPEG's entropy-coded middle: same size, and the image may still decode."""
    bad = copy(folder, tmp_path)
    tar = bad / "shard-000001.tar"
    offset, size = shards.read_index(bad / "shard-000001.idx")[0]["jpg"]
    data = bytearray(tar.read_bytes())
    data[offset + size // 2] ^= 0x10
    tar.write_bytes(bytes(data))
    assert verify.main([str(bad), "--no-progress", "--workers", "1"]) == 2
    out = capsys.readouterr().out
    assert f"{tar}: sha256 differs from the manifest's" in out and "1 problem(s)" in out


def test_cut_short_copy_and_stale_index_are_named(folder: Path, tmp_path: Path, capsys) -> None:
    bad = copy(folder, tmp_path)
    tar = bad / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    idx = bad / "shard-000002.idx"
    shutil.copy(bad / "shard-000001.idx", idx)  # the index of another shard
    assert verify.main([str(bad), "--no-progress", "--no-decode", "--workers", "1"]) == 2
    out = capsys.readouterr().out
    assert f"{tar}: " in out and "bytes, the manifest records" in out
    assert f"{idx}: sha256 differs" in out and f"{idx}: does not match the tar's own members" in out


def test_not_a_shard_folder_is_one_line(tmp_path: Path, capsys) -> None:
    assert verify.main([str(tmp_path), "--no-progress"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_missing_index_is_named(folder: Path, tmp_path: Path, capsys) -> None:
    bad = copy(folder, tmp_path)
    (bad / "shard-000001.idx").unlink()
    assert verify.main([str(bad), "--no-progress", "--no-decode", "--workers", "1"]) == 2
    assert f"{bad / 'shard-000001.idx'}: missing" in capsys.readouterr().out


def test_trainer_start_checks_sizes_and_names_verify(folder: Path, tmp_path: Path) -> None:
    from data_pipeline.shards.sharding import DataError, open_folder
    from trainer.main import check_data

    assert check_data(str(folder), "train_data", world_size=1, required=True)["totals"]["samples"] > 0
    bad = copy(folder, tmp_path)
    tar = bad / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:-512])  # a copy cut short by one tar block: the index still fits
    expected = f"{tar}: {tar.stat().st_size} bytes, manifest.json records {tar.stat().st_size + 512}"
    for check in (lambda: check_data(str(bad), "train_data", 1, True), lambda: open_folder(bad)):
        with pytest.raises(DataError) as err:
            check()
        assert str(err.value).startswith(expected)
        assert str(err.value).endswith(f"check the folder with python -m data_pipeline.shards.verify {bad}")
