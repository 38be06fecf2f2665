"""Both loaders: one batch contract, same batches in evaluation, rank sharding, equal counts, order, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from data_pipeline.loaders.loader import (
    DataError,
    LoaderSpec,
    build_loader,
    read_answers,
    read_manifest,
    read_sample_info,
)
from data_pipeline.shards import format as shards
from tests.helpers.synthetic_shards import convert_synthetic

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)
# DALI's and PIL's antialiased bilinear resizes agree within 1 of 255 levels (rounding) except on the outermost
# pixel ring when downscaling, where they treat the image border differently (measured: up to 8 levels).
LEVEL = 1 / (255 * min(STD))  # one 0..255 level in normalised units


def assert_same_pixels(a: torch.Tensor, b: torch.Tensor, border_levels: float = 10) -> None:
    diff = (a - b).abs()
    assert diff[..., 1:-1, 1:-1].max() <= 1.01 * LEVEL, diff[..., 1:-1, 1:-1].max() / LEVEL
    assert diff.max() <= border_levels * LEVEL and diff.mean() <= 0.25 * LEVEL, (
        diff.max() / LEVEL,
        diff.mean() / LEVEL,
    )


class FakeTokenizer:
    """Deterministic ids from the question text (picklable, for DataLoader workers)."""

    def __call__(self, questions: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(questions), 8, dtype=torch.long)
        for i, q in enumerate(questions):
            codes = [ord(c) for c in q[-8:]]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return {"vilt_ids": ids, "vilt_mask": (ids > 0).long(), "clip_ids": ids[:, :5].clone()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_synthetic(tmp_path_factory.mktemp("loader"))


@pytest.fixture(scope="module")
def folder_444(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of folder with 4:4:4 JPEGs: no chroma upsampling, so two decoders differ only in rounding."""
    return convert_synthetic(tmp_path_factory.mktemp("loader444"), bad=False, chroma_subsampling=False)


def load(folder: Path, kind: str, **kw) -> list[dict[str, torch.Tensor]]:
    args = dict(
        tokenizer=FakeTokenizer(),
        batch_size=4,
        image_size=48,
        mean=MEAN,
        std=STD,
        rank=0,
        world_size=1,
        train=False,
        seed=0,
        num_workers=0,
        shuffle_buffer=8,
        kind=kind,
    )
    args.update(kw)
    loader = build_loader(folder, LoaderSpec(**args))
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


def valid_qids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    out = []
    for b in batches:
        mask = b["valid"] if "valid" in b else torch.ones_like(b["question_id"], dtype=torch.bool)
        out += b["question_id"][mask].tolist()
    return out


def test_batch_contract_and_both_loaders_agree(folder: Path) -> None:
    dali = load(folder, "dali")
    torch_batches = load(folder, "torch", num_workers=1)
    n_answers = len(read_answers(folder))
    assert len(dali) == len(torch_batches) == 6  # ceil(21 / 4)
    expected = {
        "pixels": (torch.float32, (4, 3, 48, 48)),
        "vilt_ids": (torch.int64, (4, 8)),
        "vilt_mask": (torch.int64, (4, 8)),
        "clip_ids": (torch.int64, (4, 5)),
        "targets": (torch.float32, (4, n_answers)),
        "question_id": (torch.int64, (4,)),
        "valid": (torch.bool, (4,)),
    }
    for a, b in zip(dali, torch_batches, strict=True):
        for batch in (a, b):
            assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == expected
        assert torch.equal(a["question_id"], b["question_id"]) and torch.equal(a["valid"], b["valid"])
        for key in ("targets", "vilt_ids", "vilt_mask", "clip_ids"):
            assert torch.equal(a[key], b[key]), key
        assert_same_pixels(a["pixels"], b["pixels"])
    # Padding: the last batch holds 1 sample and 3 padding rows.
    last = dali[-1]
    assert last["valid"].tolist() == [True, False, False, False]
    assert last["question_id"][1:].tolist() == [-1] * 3 and last["targets"][1:].abs().sum() == 0
    assert last["pixels"][1:].abs().sum() == 0


def test_targets_are_the_stored_soft_scores(folder: Path) -> None:
    info = read_sample_info(folder)
    for b in load(folder, "dali"):
        for qid, row in zip(b["question_id"].tolist(), b["targets"], strict=True):
            if qid < 0:
                continue
            meta = info[qid]
            expected = torch.zeros_like(row)
            expected[meta["labels"]] = torch.tensor(meta["scores"])
            assert torch.equal(row, expected)


def test_real_question_tokenizer(folder: Path, tmp_path: Path) -> None:
    from data_pipeline.text import QuestionTokenizer

    questions = [m["question"] for m in read_sample_info(folder).values()]
    tok = QuestionTokenizer.build(
        questions, tmp_path, clip_arch="ViT-B-32", max_text_len=12, clip_context_length=16
    )
    b = load(folder, "torch", tokenizer=tok, batch_size=8)[0]
    assert b["vilt_ids"].shape == (8, 12) and b["clip_ids"].shape == (8, 16)
    assert b["vilt_ids"].dtype == b["vilt_mask"].dtype == b["clip_ids"].dtype == torch.int64
    assert (b["vilt_mask"].sum(1) > 2).all()  # [CLS] question [SEP]


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_sharding_covers_every_sample_once(folder: Path, kind: str, world_size: int) -> None:
    total = read_manifest(folder)["totals"]["samples"]
    per_rank = [load(folder, kind, rank=r, world_size=world_size, num_workers=2) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # equal batch counts
    qids = [q for batches in per_rank for q in valid_qids(batches)]
    assert len(qids) == len(set(qids)) == total


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_train_ranks_disjoint_equal_counts_full_batches(folder: Path, kind: str) -> None:
    per_rank = [
        load(folder, kind, rank=r, world_size=2, train=True, seed=3, num_workers=2, batch_size=3)
        for r in range(2)
    ]
    assert [len(b) for b in per_rank] == [3, 3]  # floor(21 / (2 * 3))
    sets = [set(valid_qids(b)) for b in per_rank]
    assert not sets[0] & sets[1]
    assert all("valid" not in b and b["question_id"].shape == (3,) for batches in per_rank for b in batches)
    assert all(len(valid_qids(b)) == len(s) == 9 for b, s in zip(per_rank, sets, strict=True))


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_epoch_order_is_deterministic_and_resumable(folder: Path, kind: str) -> None:
    kw = dict(train=True, batch_size=2, num_workers=2, shuffle_buffer=6)
    first = load(folder, kind, seed=7, epoch=1, **kw)
    again = load(folder, kind, seed=7, epoch=1, **kw)
    other = load(folder, kind, seed=7, epoch=2, **kw)
    assert valid_qids(first) == valid_qids(again)
    assert valid_qids(first) != valid_qids(other)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["pixels"], b["pixels"])
    resumed = load(folder, kind, seed=7, epoch=1, skip_batches=4, **kw)
    assert len(resumed) == len(first) - 4
    assert valid_qids(resumed) == valid_qids(first[4:])
    assert torch.equal(resumed[0]["pixels"], first[4]["pixels"])


class BrokenTokenizer:
    def __call__(self, questions: list[str]) -> dict[str, torch.Tensor]:
        raise RuntimeError("tokenizer exploded")


def test_dali_host_thread_stops_early_and_reraises(folder: Path) -> None:
    kw = dict(
        batch_size=4, image_size=32, mean=MEAN, std=STD, rank=0, world_size=1, train=True, seed=0, kind="dali"
    )
    loader = build_loader(folder, LoaderSpec(tokenizer=FakeTokenizer(), **kw))
    for _ in loader:
        break  # the loop leaves early: the background thread and the pipeline must go away
    assert len(list(loader)) == len(loader)  # and a second pass over the same epoch still works
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        list(build_loader(folder, LoaderSpec(tokenizer=BrokenTokenizer(), **kw)))


def test_auto_falls_back_and_says_so(
    folder: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data_pipeline.loaders import dali_loader

    spec = LoaderSpec(
        tokenizer=FakeTokenizer(), batch_size=4, image_size=32, mean=MEAN, std=STD, rank=0, world_size=1,
        train=False, seed=0, kind="auto",
    )  # fmt: skip
    expected = list(build_loader(folder, dataclasses.replace(spec, kind="torch")))
    # Without DALI: the PyTorch loader, one line saying so, and the same batches as kind="torch" gives.
    monkeypatch.setattr(dali_loader, "available", lambda: False)
    caplog.set_level("INFO", logger="data_pipeline")
    loader = build_loader(folder, spec)
    assert loader.kind == "torch"
    batches = list(loader)
    said = [r.getMessage() for r in caplog.records if "DALI is not installed" in r.getMessage()]
    assert said == ["data loader: DALI is not installed; using the PyTorch (webdataset + PIL) loader"]
    assert len(batches) == len(loader) == len(expected) > 0
    assert valid_qids(batches) == valid_qids(expected)
    for got, want in zip(batches, expected, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), [
            k for k in want if not torch.equal(got[k], want[k])
        ]
    # With DALI (pinned, so installed): DALI, on the CPU where there is no GPU, and one line saying so.
    monkeypatch.undo()
    caplog.clear()
    loader = build_loader(folder, spec)
    assert loader.kind in ("dali-gpu", "dali-cpu")
    assert loader.n_answers == len(loader.answers) == len(read_answers(folder))
    assert len(list(loader)) == len(expected)
    if not torch.cuda.is_available():
        assert loader.kind == "dali-cpu"
        assert sum("CPU mode" in r.getMessage() for r in caplog.records) == 1
    assert not any("DALI is not installed" in r.getMessage() for r in caplog.records)


def _copy_with_corrupt_sample(folder: Path, dest: Path) -> int:
    """A copy of the folder whose first sample's JPEG is cut short (as if the disk were damaged)."""
    shutil.copytree(folder, dest)
    tar = dest / "shard-000000.tar"
    with open(tar, "rb") as f:
        data = f.read()
    entry = shards.read_index(dest / "shard-000000.idx")[0]
    offset, size = entry["jpg"]
    broken = data[offset : offset + size // 3] + b"\0" * (size - size // 3)
    tar.write_bytes(data[:offset] + broken + data[offset + size :])
    return json.loads(data[entry["json"][0] : entry["json"][0] + entry["json"][1]])["question_id"]


def test_torch_loader_skips_corrupt_samples(folder: Path, tmp_path: Path, caplog) -> None:
    damaged = tmp_path / "damaged"
    bad_qid = _copy_with_corrupt_sample(folder, damaged)
    caplog.set_level("WARNING")
    loader = build_loader(
        damaged, LoaderSpec(tokenizer=FakeTokenizer(), batch_size=4, image_size=48, mean=MEAN, std=STD, rank=0, world_size=1,
        train=False, seed=0, kind="torch", num_workers=0)
    )  # fmt: skip
    evaluation = list(loader)
    assert loader.corrupt_skipped == 1
    assert bad_qid not in valid_qids(evaluation)
    assert len(valid_qids(evaluation)) == read_manifest(folder)["totals"]["samples"] - 1
    assert any("skipped 1 corrupt" in r.getMessage() for r in caplog.records)
    training = load(damaged, "torch", train=True, batch_size=4)
    assert len(training) == 5 and all(b["question_id"].shape == (4,) for b in training)


def test_errors_name_the_folder(folder: Path, tmp_path: Path) -> None:
    kw = dict(tokenizer=FakeTokenizer(), batch_size=4, image_size=32, mean=MEAN, std=STD, seed=0)
    with pytest.raises(DataError, match="nope: no such shard folder"):
        build_loader(tmp_path / "nope", LoaderSpec(rank=0, world_size=1, train=True, **kw))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a finished shard folder"):
        build_loader(tmp_path / "empty", LoaderSpec(rank=0, world_size=1, train=True, **kw))
    with pytest.raises(DataError, match="cannot give each of 8 ranks one full batch"):
        build_loader(folder, LoaderSpec(rank=0, world_size=8, train=True, **kw))
    with pytest.raises(DataError, match="21 samples for 22 ranks"):
        build_loader(folder, LoaderSpec(rank=0, world_size=22, train=False, **kw))
    with pytest.raises(ValueError, match="rank"):
        build_loader(folder, LoaderSpec(rank=2, world_size=2, train=True, **kw))
    with pytest.raises(ValueError, match="kind"):
        build_loader(folder, LoaderSpec(rank=0, world_size=1, train=True, kind="gpu", **kw))
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match="shard-000002.tar is listed in manifest.json but missing"):
        build_loader(partial, LoaderSpec(rank=0, world_size=1, train=True, **kw))


def test_444_folder_holds_444_jpegs_and_cpu_decoders_agree_on_it(folder_444: Path) -> None:
    """The folder the GPU decoder is compared on: 4:4:4 JPEGs, on which DALI's CPU decoder and PIL agree as on 4:2:0."""
    import io
    import tarfile

    from PIL import Image, JpegImagePlugin

    samplings = []
    for tar in folder_444.glob("*.tar"):
        with tarfile.open(tar) as t:
            for member in (m for m in t.getmembers() if m.name.endswith(".jpg")):
                im = Image.open(io.BytesIO(t.extractfile(member).read()))
                if im.mode == "RGB":  # a grey image has no chroma to subsample
                    samplings.append(JpegImagePlugin.get_sampling(im))
    assert samplings and set(samplings) == {0}  # 4:4:4
    for a, b in zip(load(folder_444, "dali"), load(folder_444, "torch"), strict=True):
        assert torch.equal(a["question_id"], b["question_id"])
        # Inside the image within one level as on 4:2:0; on the border ring these images reach 10.4 levels.
        assert_same_pixels(a["pixels"], b["pixels"], border_levels=16)


def _gpu_against_torch(folder: Path) -> list[torch.Tensor]:
    """Per batch, |DALI GPU decoder - PyTorch loader| in normalised units, after checking order and targets."""
    loader = build_loader(
        folder, LoaderSpec(tokenizer=FakeTokenizer(), batch_size=4, image_size=48, mean=MEAN, std=STD, rank=0, world_size=1,
        train=False, seed=0, kind="dali", device=torch.device("cuda", 0))
    )  # fmt: skip
    assert loader.kind == "dali-gpu"
    gpu = list(loader)
    reference = load(folder, "torch")
    assert len(gpu) == len(reference) == len(loader)
    diffs = []
    for a, b in zip(gpu, reference, strict=True):
        assert a["pixels"].is_cuda and not a["targets"].is_cuda
        assert torch.equal(a["question_id"], b["question_id"]) and torch.equal(a["targets"], b["targets"])
        diffs.append((a["pixels"].cpu() - b["pixels"]).abs())
    return diffs


@pytest.mark.gpu
def test_dali_gpu_decoder_matches_torch_loader(folder: Path, folder_444: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the mixed (nvJPEG) decoder cannot run here")
    # 4:4:4: nvJPEG (or the hardware decoder) and libjpeg-turbo differ only in IDCT and resize rounding: a few
    # levels inside the image, more on the border ring (resize borders differ).
    for diff in _gpu_against_torch(folder_444):
        assert diff[..., 1:-1, 1:-1].max() <= 4 * LEVEL and diff.mean() <= LEVEL, (
            diff.max() / LEVEL,
            diff.mean() / LEVEL,
        )
    # 4:2:0: chroma upsampling differs between the decoders, by tens of levels next to colour edges (H200, DALI
    # 2.4.0: max 51.6, mean 1.49 levels on the first batch of these flat-colour images); the mean stays small.
    for diff in _gpu_against_torch(folder):
        assert diff.mean() <= 3 * LEVEL, diff.mean() / LEVEL


def test_dali_names_a_damaged_image_instead_of_decoding_it(folder: Path, tmp_path: Path) -> None:
    """DALI cannot skip an undecodable image (and its CPU decoder can crash on one): the loader checks first."""
    damaged = tmp_path / "damaged"
    _copy_with_corrupt_sample(folder, damaged)
    key = shards.read_index_keys(damaged / "shard-000000.idx")[0]
    with pytest.raises(DataError, match=f"shard-000000.tar: sample {key}: damaged image, cut short") as info:
        load(damaged, "dali")
    assert len(str(info.value).splitlines()) == 1


def _copy_with_damaged_header(folder: Path, dest: Path) -> None:
    """A copy whose first shard has the header of its 3rd sample's image overwritten: tarfile stops reading there."""
    shutil.copytree(folder, dest)
    tar = dest / "shard-000000.tar"
    offset = shards.read_index(dest / "shard-000000.idx")[2]["jpg"][0] - 512
    data = bytearray(tar.read_bytes())
    data[offset : offset + 512] = b"\x55" * 512
    tar.write_bytes(bytes(data))


def test_torch_loader_refuses_or_reports_a_shard_cut_short_by_a_damaged_header(
    folder: Path, tmp_path: Path, caplog
) -> None:
    damaged = tmp_path / "damaged"
    _copy_with_damaged_header(folder, damaged)
    with pytest.raises(
        DataError, match="shard-000000.tar: the tar ends after sample 2 of the 5 .*: 3 samples lost"
    ):
        load(damaged, "torch")
    caplog.set_level("WARNING")
    evaluation = load(damaged, "torch", on_short_shard="warn")
    assert len(valid_qids(evaluation)) == read_manifest(folder)["totals"]["samples"] - 3
    assert any("3 samples lost" in r.getMessage() for r in caplog.records)
    training = load(damaged, "torch", train=True, on_short_shard="warn", num_workers=2)
    assert len(training) == 5 and all((b["question_id"] >= 0).all() for b in training)  # lost rows refilled
    assert (
        load(folder, "dali") and len(load(damaged, "dali")) == 6
    )  # DALI reads through the index: nothing lost
    with pytest.raises(ValueError, match="on_short_shard"):
        load(folder, "torch", on_short_shard="ignore")
