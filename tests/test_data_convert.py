"""The converters: shards, index files, vocabulary, soft scores, manifest, rejects, resume, refusals, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data_pipeline.answers import normalize_answer, soft_score
from data_pipeline.convert import build, synthetic
from data_pipeline.convert import cli as convert
from data_pipeline.shards import format as shards


def run(*argv: str) -> int:
    return convert.main([*argv, "--no-progress"] if argv[0] != "vqa2-answers" else list(argv))


def vqa2_args(files: synthetic.Vqa2Files, out: Path, *extra: str) -> list[str]:
    return [
        "vqa2",
        "--questions",
        str(files.questions),
        "--annotations",
        str(files.annotations),
        "--images",
        str(files.images),
        "--out",
        str(out),
        "--min-answer-count",
        "1",
        "--shard-size",
        "5",
        "--workers",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> synthetic.Vqa2Files:
    return synthetic.write_vqa2(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def converted(raw: synthetic.Vqa2Files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "train"
    assert run(*vqa2_args(raw, out)) == 0
    return out


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_manifest_counts_and_rejects(raw: synthetic.Vqa2Files, converted: Path) -> None:
    m = json.loads((converted / "manifest.json").read_text())
    n_ok = len(raw.question_ids) - len(raw.rejected)
    assert m["totals"]["questions"] == len(raw.question_ids)
    assert m["totals"]["samples"] == n_ok == sum(s["samples"] for s in m["shards"])
    assert m["totals"]["rejected"] == len(raw.rejected) == len(m["rejected"])
    assert {r["question_id"]: r["reason"].split(":")[0] for r in m["rejected"]} == raw.rejected
    assert m["has_answers"] is True and m["source"] == "vqa2"
    sizes = [s["samples"] for s in m["shards"]]
    assert max(sizes) <= 5 and max(sizes) - min(sizes) <= 1 and len(sizes) == -(-n_ok // 5)


def test_samples_hold_source_bytes_and_soft_scores(raw: synthetic.Vqa2Files, converted: Path) -> None:
    answers = json.loads((converted / "answers.json").read_text())
    anns = {a["question_id"]: a for a in json.loads(raw.annotations.read_text())["annotations"]}
    seen = set()
    for shard in sorted(converted.glob("*.tar")):
        for key, comp in tar_samples(shard).items():
            assert list(comp) == ["jpg", "json"]
            meta = json.loads(comp["json"])
            qid = meta["question_id"]
            assert key == f"{qid:012d}" and qid not in raw.rejected
            seen.add(qid)
            ann = anns[qid]
            src = raw.images / f"COCO_train2014_{meta['image_id']:012d}.jpg"
            assert comp["jpg"] == src.read_bytes()  # no re-encoding
            assert meta["answers"] == [a["answer"] for a in ann["answers"]]
            assert meta["answer_type"] == ann["answer_type"]
            counts: dict[str, int] = {}
            for a in meta["answers"]:
                counts[normalize_answer(a)] = counts.get(normalize_answer(a), 0) + 1
            expected = {answers.index(a): soft_score(n) for a, n in counts.items() if a in answers}
            assert dict(zip(meta["labels"], meta["scores"], strict=True)) == expected
            assert sorted(meta["scores"], reverse=True)[0] == 1.0  # 6 of 10 agree on the true answer
    assert seen == set(raw.question_ids) - set(raw.rejected)


def test_vocabulary_is_normalised_majority_answers(raw: synthetic.Vqa2Files, converted: Path) -> None:
    answers = json.loads((converted / "answers.json").read_text())
    majors = [a["multiple_choice_answer"] for a in json.loads(raw.annotations.read_text())["annotations"]]
    assert set(answers) == {normalize_answer(a) for a in majors}
    assert len(answers) == len(set(answers))


def test_index_files_match_wds2idx(converted: Path, tmp_path: Path) -> None:
    tool = Path(sys.executable).parent / "wds2idx"
    # pyproject.toml pins nvidia-dali, which installs wds2idx beside the interpreter: missing, the set-up is broken.
    assert tool.exists(), (
        f"{tool} is missing: run ./launch.sh setup (wds2idx comes with the pinned nvidia-dali)"
    )
    if shutil.which("tar") is None:
        pytest.skip(
            "no `tar` on PATH: DALI's wds2idx runs GNU tar (--list --block-number), a system tool set-up does not install"
        )
    for shard in sorted(converted.glob("*.tar")):
        ref = tmp_path / (shard.stem + ".idx")
        subprocess.run([tool, str(shard), str(ref)], check=True, capture_output=True)
        assert (converted / (shard.stem + ".idx")).read_text() == ref.read_text()
        assert shards.index_lines(shard) == ref.read_text().splitlines()[1:]  # the read-back indexer agrees
        parsed = shards.read_index(ref)
        assert all(set(e) == {"jpg", "json"} for e in parsed)


def test_index_files_are_accepted_by_dali(converted: Path) -> None:
    from nvidia.dali import fn, pipeline_def

    tars = sorted(converted.glob("*.tar"))
    total = json.loads((converted / "manifest.json").read_text())["totals"]["samples"]

    @pipeline_def(batch_size=total, num_threads=1, device_id=None)
    def pipe():
        _, meta = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "json"],
            missing_component_behavior="error",
        )
        return meta

    p = pipe()
    p.build()
    (out,) = p.run()
    qids = {json.loads(bytes(out.at(i)))["question_id"] for i in range(total)}
    assert len(qids) == total


def test_refuses_finished_output_unless_overwrite(raw, converted, capsys) -> None:
    before = (converted / "manifest.json").read_bytes()
    assert run(*vqa2_args(raw, converted)) == 2
    assert "already holds a finished conversion" in capsys.readouterr().err
    assert (converted / "manifest.json").read_bytes() == before


def test_overwrite_gives_identical_shards(raw, converted, tmp_path) -> None:
    out = tmp_path / "again"
    shutil.copytree(converted, out)
    assert run(*vqa2_args(raw, out, "--overwrite")) == 0
    for shard in converted.glob("shard-*"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()  # deterministic output


def test_resume_after_interruption(raw, converted, tmp_path, monkeypatch) -> None:
    out = tmp_path / "resumed"
    real = build._write_shard
    calls = {"n": 0}

    def dies_on_third(task):
        calls["n"] += 1
        if calls["n"] == 3:
            # A crash halfway through a shard: the temporary tar exists, the final one does not.
            Path(task[0] + ".tmp-123").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(build, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(*vqa2_args(raw, out))
    assert not (out / "manifest.json").exists()
    first = out / "shard-000000.tar"
    inode = first.stat().st_ino
    monkeypatch.setattr(build, "_write_shard", real)
    assert run(*vqa2_args(raw, out)) == 0
    assert first.stat().st_ino == inode  # finished shards are kept, not rewritten
    assert not list(out.glob("*.tmp-*")) and not (out / ".work").exists()
    for shard in converted.glob("shard-*"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_full_disk_is_one_line_and_a_rerun_resumes(raw, converted, tmp_path, monkeypatch, capsys) -> None:
    import errno
    import os

    out = tmp_path / "full"
    real = build._write_shard
    calls = {"n": 0}

    def disk_fills_on_third(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), task[0] + ".tmp-9")
        return real(task)

    monkeypatch.setattr(build, "_write_shard", disk_fills_on_third)
    assert run(*vqa2_args(raw, out)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(lines) == 1
        and "no space left on the device" in lines[0]
        and "run the same command again" in lines[0]
    )
    assert "Traceback" not in err and not (out / "manifest.json").exists()
    monkeypatch.setattr(build, "_write_shard", real)
    assert run(*vqa2_args(raw, out)) == 0
    for shard in converted.glob("shard-*"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_strict_fails_on_rejections(raw, tmp_path, capsys) -> None:
    assert run(*vqa2_args(raw, tmp_path / "s", "--strict")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --strict:") and "rejected" in err and len(err.strip().splitlines()) == 1


def test_vqa2_answers_and_reuse_for_a_test_split(raw, tmp_path) -> None:
    other = synthetic.write_vqa2(tmp_path / "val", split="val2014", seed=1, n_images=3, bad=False)
    vocab = tmp_path / "answers.json"
    assert (
        run(
            "vqa2-answers",
            "--annotations",
            str(raw.annotations),
            str(other.annotations),
            "--out",
            str(vocab),
            "--min-answer-count",
            "2",
        )
        == 0
    )
    answers = json.loads(vocab.read_text())
    assert answers and all(a == normalize_answer(a) for a in answers)
    assert run("vqa2-answers", "--annotations", str(raw.annotations), "--out", str(vocab)) == 2  # exists
    out = tmp_path / "test"
    args = ["vqa2", "--questions", str(other.questions), "--images", str(other.images), "--out", str(out)]
    assert run(*args, "--workers", "1") == 2  # no annotations and no vocabulary
    assert run(*args, "--workers", "1", "--answers", str(vocab)) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["has_answers"] is False and m["totals"]["samples"] == len(other.question_ids)
    assert json.loads((out / "answers.json").read_text()) == answers
    meta = json.loads(tar_samples(out / "shard-000000.tar").popitem()[1]["json"])
    assert meta["labels"] == [] and meta["answers"] == []


def _bad(tmp_path: Path, name: str, content: str) -> str:
    p = tmp_path / name
    p.write_text(content)
    return str(p)


@pytest.mark.parametrize(
    ("which", "content", "expected"),
    [
        ("questions", '{"questions": [', "not valid JSON (line 1"),
        ("questions", '{"annotations": []}', "missing field 'questions'"),
        (
            "questions",
            '{"questions": [{"image_id": 1, "question": "q?"}]}',
            "questions[0]: missing field 'question_id'",
        ),
        (
            "questions",
            '{"questions": [{"image_id": "1", "question": "q?", "question_id": 5}]}',
            "field 'image_id' must be int",
        ),
        (
            "annotations",
            '{"annotations": [{"question_id": 1, "image_id": 1, "multiple_choice_answer": "x"}]}',
            "annotations[0]: missing field 'answers'",
        ),
        ("annotations", '{"questions": []}', "missing field 'annotations'"),
    ],
)
def test_bad_json_is_one_line_naming_file_and_field(raw, tmp_path, capsys, which, content, expected) -> None:
    bad = _bad(tmp_path, f"{which}.json", content)
    files = synthetic.Vqa2Files(raw.root, raw.questions, raw.annotations, raw.images, raw.split)
    setattr(files, which, Path(bad))
    assert run(*vqa2_args(files, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad in err and expected in err, err


def test_missing_inputs_are_named(raw, tmp_path, capsys) -> None:
    files = synthetic.Vqa2Files(raw.root, raw.questions, raw.annotations, tmp_path / "nope", raw.split)
    assert run(*vqa2_args(files, tmp_path / "out")) == 2
    assert "nope: no such folder (--images)" in capsys.readouterr().err
    files = synthetic.Vqa2Files(raw.root, tmp_path / "q.json", raw.annotations, raw.images, raw.split)
    assert run(*vqa2_args(files, tmp_path / "out")) == 2
    assert "q.json: no such file (--questions)" in capsys.readouterr().err


def test_easyvqa_converter_on_a_subset(tmp_path, monkeypatch) -> None:
    """The real easy-VQA files, cut to a few questions per split; two worker processes."""
    import easy_vqa

    for name in ("get_train_questions", "get_test_questions"):
        full = getattr(easy_vqa, name)()
        monkeypatch.setattr(easy_vqa, name, lambda full=full: tuple(col[:30] for col in full))
    assert run("easyvqa", "--out", str(tmp_path / "e"), "--shard-size", "10", "--workers", "2") == 0
    answers = easy_vqa.get_answers()
    for split, offset in (("train", 0), ("test", 1_000_000)):
        folder = tmp_path / "e" / split
        m = json.loads((folder / "manifest.json").read_text())
        assert m["totals"]["samples"] == 30 and len(m["shards"]) == 3 and m["rejected"] == []
        assert json.loads((folder / "answers.json").read_text()) == answers
        texts, truth, _ = getattr(easy_vqa, f"get_{split}_questions")()
        for shard in folder.glob("*.tar"):
            for comp in tar_samples(shard).values():
                assert comp["jpg"][:3] == b"\xff\xd8\xff"  # PNG converted to JPEG
                meta = json.loads(comp["json"])
                i = meta["question_id"] - offset
                assert meta["question"] == texts[i] and meta["labels"] == [answers.index(truth[i])]
                assert meta["scores"] == [1.0] and "answer_type" not in meta
    assert run("easyvqa", "--out", str(tmp_path / "e")) == 2  # finished: refused


def test_annotations_without_a_question_are_counted(raw, tmp_path, capsys) -> None:
    anns = json.loads(raw.annotations.read_text())
    orphan = dict(anns["annotations"][0], question_id=999_999_001)
    anns["annotations"].append(orphan)
    files = synthetic.Vqa2Files(raw.root, raw.questions, tmp_path / "a.json", raw.images, raw.split)
    files.annotations.write_text(json.dumps(anns))
    assert run(*vqa2_args(files, tmp_path / "out")) == 0
    assert "1 annotations without a question ignored" in capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["unreferenced_annotations"]["count"] == 1
    assert m["unreferenced_annotations"]["question_ids"] == [999_999_001]


def test_image_size_stores_the_loaders_squash_and_the_trainer_refuses_a_larger_size(
    raw: synthetic.Vqa2Files, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--image-size N: every image squashed once to N x N as the loaders would (PIL bilinear), re-encoded at
    --jpeg-quality, recorded in the manifest; a training run at a larger size stops before start-up naming both."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline.shards.sharding import DataError, check_image_size

    out = tmp_path / "small"
    # 4:4:4: the comparison below bounds the JPEG error of the squash, not 4:2:0's halved colour resolution.
    assert (
        run(
            *vqa2_args(
                raw, out, "--image-size", "24", "--jpeg-quality", "90", "--chroma-subsampling", "4:4:4"
            )
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    settings = manifest["settings"]
    assert (settings["image_mode"], settings["image_size"], settings["jpeg_quality"]) == ("jpeg", 24, 90)
    assert json.loads((converted / "manifest.json").read_text())["settings"]["image_size"] is None
    originals = {p.name.rsplit("_", 1)[1].split(".")[0]: p for p in raw.images.iterdir()}
    checked = 0
    for tar in sorted(out.glob("*.tar")):
        for sample in tar_samples(tar).values():
            meta = json.loads(sample["json"])
            stored = Image.open(io.BytesIO(sample["jpg"]))
            assert stored.format == "JPEG" and stored.size == (24, 24)
            with Image.open(originals[f"{meta['image_id']:012d}"]) as src:
                squash = np.asarray(src.convert("RGB").resize((24, 24), Image.BILINEAR), dtype=np.float64)
            assert (
                np.abs(np.asarray(stored.convert("RGB"), dtype=np.float64) - squash).mean() < 4
            )  # JPEG error only
            checked += 1
    assert checked == manifest["totals"]["samples"] > 0

    def image_bytes(folder: Path) -> int:
        return sum(len(x["jpg"]) for tar in folder.glob("*.tar") for x in tar_samples(tar).values())

    assert image_bytes(out) < image_bytes(converted)  # up to 120 px wide sources stored at 24 x 24

    check_image_size(out, manifest, 24)
    check_image_size(out, manifest, 16)  # smaller: the loaders downsample, nothing lost
    check_image_size(converted, json.loads((converted / "manifest.json").read_text()), 4096)  # as they were
    with pytest.raises(DataError, match=r"stored at 24 x 24 px .*model.image_size is 32: convert again"):
        check_image_size(out, manifest, 32)
    from trainer.main import check_data  # the trainer's start-up check of --train-data/--val-data

    with pytest.raises(DataError, match="model.image_size is 32"):
        check_data(str(out), "train_data", 1, True, 32)
    capsys.readouterr()
    assert run(*vqa2_args(raw, tmp_path / "bad", "--image-size", "0")) == 2
    assert "--image-size must be >= 1, got 0" in capsys.readouterr().err


def test_skip_out_of_vocab_leaves_out_questions_with_all_zero_targets(raw, tmp_path) -> None:
    """With a vocabulary that covers only some questions: kept by default (all-zero targets, counted), left out with
    --skip-out-of-vocab, and the manifest says which."""
    from data_pipeline.answers import normalize_answer
    from data_pipeline.shards.sharding import iter_sample_json, open_folder

    annotations = json.loads(raw.annotations.read_text())["annotations"]
    vocab = sorted({normalize_answer(a["multiple_choice_answer"]) for a in annotations})[:2]
    (tmp_path / "answers.json").write_text(json.dumps(vocab))
    covered = {
        a["question_id"]
        for a in annotations
        if any(normalize_answer(x["answer"]) in vocab for x in a["answers"])
    }
    usable = set(raw.question_ids) - set(raw.rejected)
    assert covered & usable and usable - covered  # the case needs both kinds of question

    def convert_to(name: str, *extra: str) -> tuple[set[int], dict]:
        out = tmp_path / name
        args = vqa2_args(raw, out, "--answers", str(tmp_path / "answers.json"), *extra)
        args.remove("--min-answer-count")
        args.remove("1")
        assert run(*args) == 0
        metas = list(iter_sample_json(open_folder(str(out))))
        assert all((m["labels"] != []) == (m["question_id"] in covered) for m in metas)
        return {m["question_id"] for m in metas}, json.loads((out / "manifest.json").read_text())

    kept, manifest = convert_to("kept")
    assert kept == usable
    assert manifest["out_of_vocabulary"]["questions"] == len(usable - covered)
    assert manifest["out_of_vocabulary"]["left_out"] is False
    skipped, manifest = convert_to("skipped", "--skip-out-of-vocab")
    assert skipped == usable & covered
    assert manifest["out_of_vocabulary"]["left_out"] is True
    assert manifest["totals"]["samples"] == len(usable & covered)


def test_synthetic_command_writes_the_official_layout_once(tmp_path, capsys) -> None:
    from data_pipeline.convert import synthetic

    raw = tmp_path / "raw"
    assert synthetic.main(["--out", str(raw), "--images", "3"]) == 0
    for split in ("train2014", "val2014"):
        questions, annotations, images = synthetic.official_names(split)
        assert json.loads((raw / questions).read_text())["data_subtype"] == split
        assert len(json.loads((raw / annotations).read_text())["annotations"]) == 9
        assert len(list((raw / images).glob(f"COCO_{split}_*.jpg"))) == 3
    capsys.readouterr()
    assert synthetic.main(["--out", str(raw), "--images", "3"]) == 2  # never over an existing download
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds" in err[0], err


def test_a_conversion_logged_to_a_file_draws_each_bar_rarely(tmp_path, monkeypatch, capsys) -> None:
    """Into a job's log (stderr not a terminal) a bar is drawn when it starts and ends, not every 0.1 s with a
    carriage return: a conversion of many images would otherwise write thousands of redraws onto one line."""
    import easy_vqa

    for name in ("get_train_questions", "get_test_questions"):
        full = getattr(easy_vqa, name)()
        monkeypatch.setattr(easy_vqa, name, lambda full=full: tuple(col[:600] for col in full))
    monkeypatch.setattr("common.progress.NON_TTY_BAR_INTERVAL_S", 3600.0)
    convert_image = build.convert_to_jpeg

    def slow(task):  # ~0.6 s per split: a bar redrawn every 0.1 s would show up several times
        time.sleep(0.01)
        return convert_image(task)

    monkeypatch.setattr(build, "convert_to_jpeg", slow)
    assert (
        convert.main(["easyvqa", "--out", str(tmp_path / "e"), "--shard-size", "100", "--workers", "1"]) == 0
    )
    err = capsys.readouterr().err
    for split in ("train", "test"):
        for bar in ("check images", "write shards"):
            draws = err.count(f"{split}: {bar}:")
            assert 1 <= draws <= 3, (split, bar, draws)  # the start, the end, and at most one refresh between
