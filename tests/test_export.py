"""The export folder (trainer/serve/export.py): its layout, loading it without pickle, and damaged folders.

One fp32 rank trains 2 steps in this process (ZeRO stage 0, as trainer/engine/engine.py runs one rank) with the compact CLIP
token table, so that the export carries the tokenizer's CLIP ids too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

TINY = [
    "--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=8",
    "--set", "train.log_every=1", "--set", "train.progress_bar=false", "--set", "data.num_workers=1",
    "--set", "model.clip_text_vocab=compact",
]  # fmt: skip
QUESTIONS = ["what shape is in the image?", "what color is the shape?"]


@pytest.fixture(scope="module")
def tiny_run(tiny_easyvqa_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.main import main

    run_dir = tmp_path_factory.mktemp("export_run") / "run"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    assert main([*args, "--max-steps", "2", "--set", "train.ckpt_every=2"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.serve import export

    out = tmp_path_factory.mktemp("export") / "model"
    assert export.main(["--run-dir", str(tiny_run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images() -> list[str]:
    import easy_vqa

    return [str(p) for p in list(easy_vqa.get_test_image_paths().values())[:3]]


def _no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling from here on fails the test."""
    import pickle

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an export folder is loaded without pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def _answers(capsys: pytest.CaptureFixture, argv: list[str]) -> list[dict]:
    from trainer.serve import predict

    capsys.readouterr()
    assert predict.main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_the_export_is_a_folder_of_safetensors_json_and_the_tokenizer(tiny_run: Path, exported: Path) -> None:
    from safetensors.torch import load_file

    from trainer.serve.export import fp32_state_dict

    assert sorted(p.name for p in exported.iterdir()) == [
        "answers.json",
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]
    meta = json.loads((exported / "config.json").read_text())
    assert (meta["format"], meta["format_version"], meta["step"], meta["tag"]) == (
        "vqa-align/export",
        1,
        2,
        "global_step2",
    )
    assert meta["config"] == json.loads((tiny_run / "config.json").read_text())
    assert json.loads((exported / "answers.json").read_text()) == json.loads(
        (tiny_run / "answers.json").read_text()
    )
    run_tok = sorted(p.name for p in (tiny_run / "tokenizer").iterdir())
    assert (
        "clip_vocab.json" in run_tok and sorted(p.name for p in (exported / "tokenizer").iterdir()) == run_tok
    )
    for name in run_tok:
        assert (exported / "tokenizer" / name).read_bytes() == (tiny_run / "tokenizer" / name).read_bytes()
    # The checkpoint's weights, in fp32, under the task's own names.
    weights = load_file(exported / "model.safetensors")
    expected = fp32_state_dict(tiny_run, "global_step2")
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        assert weights[name].dtype == value.dtype and torch.equal(weights[name], value), name
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_from_pretrained_loads_without_pickle_and_predicts_as_the_run(
    tiny_run: Path,
    exported: Path,
    images: list[str],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trainer.serve import export

    pairs = ["--image", images[0], "--question", QUESTIONS[0], "--question", QUESTIONS[1]]
    many = [x for im in images for x in ("--image", im)] + ["--question", QUESTIONS[0]]
    from_run = [_answers(capsys, ["--run-dir", str(tiny_run), *a]) for a in (pairs, many)]

    with monkeypatch.context() as m:
        _no_pickle(m)
        task, tokenizer, answers, cfg = export.from_pretrained(exported)  # strict load of every weight
        from_export = [_answers(capsys, ["--weights", str(exported), *a]) for a in (pairs, many)]

    assert not task.training and cfg.model.variant == "clip-infonce-dot" and len(answers) == 13
    assert (
        tokenizer.clip_vocab
        and task.model.clip.token_embedding.num_embeddings == len(tokenizer.clip_vocab) + 1
    )
    assert [len(rows) for rows in from_export] == [2, 3]
    assert from_export == from_run


@pytest.mark.parametrize(
    "case",
    [
        "no-weights",
        "no-config",
        "no-answers",
        "no-tokenizer",
        "wrong-shape",
        "missing-tensor",
        "torn",
        "version",
    ],
)
def test_a_damaged_export_is_a_one_line_error_naming_the_file(
    case: str, exported: Path, images: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from safetensors.torch import load_file, save_file

    from trainer.config.config import ConfigError
    from trainer.serve import export, predict

    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    weights = folder / "model.safetensors"
    if case.startswith("no-"):
        file = {
            "no-weights": weights,
            "no-config": folder / "config.json",
            "no-answers": folder / "answers.json",
            "no-tokenizer": folder / "tokenizer" / "question_tokenizer.json",
        }[case]
        file.unlink()
        expected = f"{file}: missing"
    elif case in ("wrong-shape", "missing-tensor"):
        sd = load_file(weights)
        name = "model.classifier.3.weight"  # the answer head's last layer
        if case == "wrong-shape":
            sd[name] = torch.zeros(sd[name].shape[0] + 1, *sd[name].shape[1:])
            expected = f"{weights}: weights do not fit the model of config.json (size mismatch for {name}"
        else:
            del sd[name]
            expected = f"{weights}: weights do not fit the model of config.json (Missing key(s)"
        save_file(sd, weights)
    elif case == "torn":
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = f"{weights}: not a safetensors file that can be read"
    else:
        meta = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(meta, format_version=2)))
        expected = f"{folder / 'config.json'}: format_version 2"

    with pytest.raises(ConfigError) as err:
        export.from_pretrained(folder)
    assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith(expected), err.value
    capsys.readouterr()
    assert predict.main(["--weights", str(folder), "--image", images[0], "--question", QUESTIONS[0]]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {err.value}" and captured.out == "", captured.err


def test_export_replaces_an_earlier_export_and_refuses_any_other_folder(
    tiny_run: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from trainer.serve import export

    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    (folder / "tokenizer" / "stale.json").write_text("{}\n")  # a file an earlier tokenizer had
    (folder / "config.json").unlink()  # an export cut short
    assert export.main(["--run-dir", str(tiny_run), "--out", str(folder)]) == 0
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == sorted(
        p.name for p in (exported / "tokenizer").iterdir()
    )
    assert (folder / "config.json").read_bytes() == (exported / "config.json").read_bytes()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert export.main(["--run-dir", str(tiny_run), "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {other}: holds files that are not an export's (notes.txt)"), err
    assert len(err.splitlines()) == 1 and sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_predictor_answers_a_list_of_pairs_as_the_command_does(
    exported: Path, images: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Predictor.predict on paths and PIL images, batched, equals `python -m trainer.serve.predict --pairs FILE`."""
    from PIL import Image

    from trainer.serve.predictor import Predictor

    pairs = [(im, q) for im in images for q in QUESTIONS]  # 6 pairs, answered 4 at a time below
    lines = [json.dumps({"image": Path(im).name, "question": q}) for im, q in pairs]  # relative to the file
    folder = tmp_path / "pairs"
    folder.mkdir()
    for im in images:
        shutil.copy(im, folder / Path(im).name)
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    from_command = _answers(
        capsys, ["--weights", str(exported), "--pairs", str(folder / "pairs.jsonl"), "--top-k", "2"]
    )

    predictor = Predictor.from_pretrained(exported)
    assert predictor.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = [str(folder / Path(im).name) for im, _ in pairs]
    got = predictor.predict(paths, [q for _, q in pairs], top_k=2, batch_size=4)
    assert got == from_command and len(got) == 6 and all(len(r["top"]) == 2 for r in got)
    # A PIL image answers as its file does; one image is asked every question.
    with Image.open(paths[0]) as im:
        pil = predictor.predict(im.copy(), QUESTIONS, top_k=2)
    assert [(r["image"], r["answer"], r["p"]) for r in pil] == [(None, r["answer"], r["p"]) for r in got[:2]]


def test_the_exported_module_answers_without_targets(exported: Path) -> None:
    from trainer.serve.export import from_pretrained
    from trainer.serve.predict import to_pixels

    task, tokenizer, answers, cfg = from_pretrained(exported)
    batch = dict(tokenizer(QUESTIONS))
    batch["pixels"] = torch.zeros(2, 3, cfg.model.image_size, cfg.model.image_size)
    out = task(batch)  # no "targets": inference
    assert set(out) == {"logits"} and out["logits"].shape == (2, len(answers))
    from PIL import Image

    red = Image.new("RGB", (10, 7), (200, 30, 30))
    assert (
        to_pixels(red, cfg.model.image_size, task.image_mean, task.image_std).shape
        == batch["pixels"].shape[1:]
    )


def test_export_files_are_readable_as_the_umask_says(tiny_run: Path, tmp_path: Path) -> None:
    import os

    from trainer.serve import export

    previous = os.umask(0o027)
    try:
        out = tmp_path / "model"
        assert export.main(["--run-dir", str(tiny_run), "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes == dict.fromkeys(["answers.json", "config.json", "model.safetensors"], 0o640), modes


def test_predict_pairs_file_errors_name_the_line(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from trainer.serve import predict

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"image": "a.png", "question": "what?"}\n["not", "a", "pair"]\n')
    capsys.readouterr()
    assert predict.main(["--weights", str(exported), "--pairs", str(pairs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--pairs {pairs}, line 2: expected" in err[0], err
    assert predict.main(["--weights", str(exported), "--pairs", str(pairs), "--image", "a.png"]) == 2
    assert "give --image and --question, or --pairs FILE" in capsys.readouterr().err
