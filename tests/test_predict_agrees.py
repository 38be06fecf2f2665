"""`predict` answers as the run's own evaluation does, from ZeRO-2, ZeRO-3 and universal checkpoints of 2 ranks.

Each run trains 2 steps on 2 CPU ranks and evaluates the test split at the end with the PyTorch loader, whose image
preprocessing (PIL, RGB, bilinear squash) is the one `python -m trainer.serve.predict` applies to an image file. The test
then writes the very JPEG bytes the shards hold for a few evaluation questions to files and asks `predict`, from the
run folder (its ZeRO shards gathered by zero_to_fp32, or the ZeRO-2 checkpoint's universal conversion) and from an
export folder of each (safetensors, no pickle), the same questions about them: every answer must be the one in the
evaluation's predictions file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_main_deepspeed import TINY, launch

from data_pipeline.shards import format as shards
from data_pipeline.shards.sharding import open_folder

pytestmark = pytest.mark.slow
QUESTIONS_ASKED = 8


def _evaluation_samples(folder: Path, out: Path, n: int) -> list[tuple[int, Path, str]]:
    """(question id, image file, question) of the first `n` samples of a shard folder, the image as stored."""
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for shard in open_folder(str(folder)).shards:
        data = shard.tar.read_bytes()
        for entry in shards.read_index(shard.index):
            (jo, js), (io_, is_) = entry["json"], entry["jpg"]
            meta = json.loads(data[jo : jo + js])
            image = out / f"{meta['question_id']}.jpg"
            image.write_bytes(data[io_ : io_ + is_])
            samples.append((int(meta["question_id"]), image, str(meta["question"])))
            if len(samples) == n:
                return samples
    return samples


def _predict(
    capsys: pytest.CaptureFixture, source: list[str], samples: list[tuple[int, Path, str]]
) -> list[str]:
    from trainer.serve import predict

    answers = []
    for _, image, question in samples:  # one pair per call: an image and a question
        capsys.readouterr()
        assert predict.main([*source, "--image", str(image), "--question", question]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        answers.append(rows[0]["answer"])
    return answers


@pytest.mark.parametrize("ds_json", ["zero2_fp32.json", "zero3_fp32.json"])
def test_predict_gives_the_evaluation_answers(
    ds_json: str, tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    val = tiny_easyvqa_shards / "test"
    args = [*TINY, "--train-data", str(tiny_easyvqa_shards / "train"), "--val-data", str(val)]
    args += ["--run-dir", str(run_dir), "--max-steps", "2", "--set", "data.loader=torch"]
    args += ["--deepspeed_config", f"deepspeed_configs/{ds_json}"]
    launch(args)
    state = json.loads((run_dir / "checkpoints" / "global_step2" / "trainer_state.json").read_text())
    assert (state["world_size"], state["zero_stage"]) == (2, int(ds_json[4]))
    evaluated = {
        p["question_id"]: p["answer"]
        for p in json.loads((run_dir / "eval" / "val_predictions_step00000002.json").read_text())
    }
    samples = _evaluation_samples(val, tmp_path / "images", QUESTIONS_ASKED)
    expected = [evaluated[qid] for qid, _, _ in samples]

    assert _predict(capsys, ["--run-dir", str(run_dir)], samples) == expected

    from trainer.serve import export

    out = tmp_path / "model"
    assert export.main(["--run-dir", str(run_dir), "--out", str(out)]) == 0
    assert _predict(capsys, ["--weights", str(out)], samples) == expected

    if ds_json.startswith("zero2"):
        # The same weights through DeepSpeed's universal checkpoint (one fp32 file per parameter).
        from trainer.checkpoint.universal import to_universal

        universal = to_universal(run_dir, "global_step2").name
        assert _predict(capsys, ["--run-dir", str(run_dir), "--tag", universal], samples) == expected
        out = tmp_path / "model-universal"
        assert export.main(["--run-dir", str(run_dir), "--tag", universal, "--out", str(out)]) == 0
        assert _predict(capsys, ["--weights", str(out)], samples) == expected
