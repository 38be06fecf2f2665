"""trainer/modeling/weights.py and `./launch.sh fetch-weights`: a preset's pretrained checkpoints fetched into a cache folder,
the `--set` lines printed for them, the trainer loading them with the hub out of reach, and the one-line error at
start when a checkpoint is not on local disk.

Tests never reach the network. The two hub clients are replaced at their boundary by a stand-in that copies from a
local folder laid out like the hub (ORG/NAME/FILES): `huggingface_hub.snapshot_download` (ViLT) and the
`hf_hub_download` that open_clip's own download calls (CLIP). The stand-in's folder holds checkpoints the tests save
themselves: a tiny ViltModel with its tokenizer (save_pretrained) and a tiny open_clip model's state dict (torch.save).
Everything before those two calls (options, presets, open_clip's choice of repository and file) and after them (the
files on disk, the printed lines, the trainer reading them) is the project's real code.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import open_clip.pretrained
import pytest
import test_launch
import torch
from test_launch import Checkout

from tests.helpers.launch_env import clean_env
from trainer.config.config import apply_overrides
from trainer.config.presets import get_preset
from trainer.modeling import weights as W

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = "0" * 40


class FakeHub:
    """The hub's two download calls, served from `root/ORG/NAME/FILE`; every request is recorded in `calls`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple] = []

    def repo(self, repo_id: str) -> Path:
        path = self.root / repo_id
        if not path.is_dir():
            raise OSError(f"404 Client Error: repository {repo_id} not found")
        return path

    def snapshot_download(
        self, repo_id: str, *, local_dir: Path, allow_patterns: list[str], **_: object
    ) -> str:
        self.calls.append(("snapshot_download", repo_id, Path(local_dir), list(allow_patterns)))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for file in sorted(self.repo(repo_id).iterdir()):
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy2(file, Path(local_dir) / file.name)
        return str(local_dir)

    def hf_hub_download(self, repo_id: str, filename: str, *, cache_dir: str, **_: object) -> str:
        self.calls.append(("hf_hub_download", repo_id, filename, Path(cache_dir)))
        source = self.repo(repo_id) / filename
        if not source.is_file():
            raise OSError(f"404 Client Error: {repo_id} has no file {filename}")
        target = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SNAPSHOT / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return str(target)

    def add(self, repo_id: str, files: dict[str, bytes]) -> Path:
        path = self.root / repo_id
        path.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (path / name).write_bytes(data)
        return path


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", fake.hf_hub_download)
    # An empty Hugging Face cache, whatever the one of the machine running the tests holds.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return fake


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    """`python -m trainer.modeling.weights ARGV` in-process: (exit status, stdout lines, stderr `error:` lines)."""
    rc = W.main(argv)
    out, err = capsys.readouterr()
    return rc, out.splitlines(), [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = W.main(["--timeout", value, "--vilt", "none", "--clip", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "argument --timeout: must be" in err.strip().splitlines()[-1] and f"'{value}'" in err


def test_the_timeout_reaches_every_hub_request_and_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's metadata calls pass timeout=None, which would override a client default: the request hook
    fills it in. After main() the library's settings are its own again."""
    import socket

    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    factory, default_timeout = _http._GLOBAL_CLIENT_FACTORY, socket.getdefaulttimeout()
    restore = W.set_timeout(7.5)
    try:
        client = huggingface_hub.get_session()
        request = client.build_request("GET", "http://127.0.0.1:9/api/models/x", timeout=None)
        client.event_hooks["request"][-1](request)  # ours (the library's first one refuses offline mode)
        assert request.extensions["timeout"] == dict.fromkeys(("connect", "read", "write", "pool"), 7.5)
        assert isinstance(client._transport, httpx2.HTTPTransport) and socket.getdefaulttimeout() == 7.5
        assert constants.HF_HUB_ETAG_TIMEOUT == 8 and os.environ["HF_HUB_ETAG_TIMEOUT"] == "8"
    finally:
        restore()
    assert _http._GLOBAL_CLIENT_FACTORY is factory and socket.getdefaulttimeout() == default_timeout
    assert "HF_HUB_ETAG_TIMEOUT" not in os.environ


# -- fetching ------------------------------------------------------------------------------------------------------


def test_vqa2_base_fetches_vilt_and_openai_clip_and_prints_the_set_lines(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add(
        "dandelin/vilt-b32-mlm", {n: b"{}" for n in ("config.json", "tokenizer.json", "model.safetensors")}
    )
    hub.add("dandelin/vilt-b32-mlm", {"tf_model.h5": b"not wanted", "vocab.txt": b"[PAD]\n"})
    hub.add("timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": b"weights"})
    cache = tmp_path / "weights"
    rc = W.main(["--preset", "vqa2-base", "--cache", str(cache)])
    out, err = capsys.readouterr()
    vilt = cache / "vilt" / "dandelin--vilt-b32-mlm"
    clip = cache / "open_clip" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / SNAPSHOT
    assert rc == 0, err
    assert out.splitlines() == [
        f"--set model.vilt_pretrained={vilt}",
        f"--set model.clip_pretrained={clip / 'open_clip_model.safetensors'}",
    ]
    # ViLT through snapshot_download (config, tokenizer, weights; no TF copy), CLIP through open_clip's own choice
    # of repository and file for ViT-B-32-quickgelu's `openai` tag (its safetensors file first).
    assert hub.calls == [
        ("snapshot_download", "dandelin/vilt-b32-mlm", vilt, W.VILT_PATTERNS),
        (
            "hf_hub_download",
            "timm/vit_base_patch32_clip_224.openai",
            "open_clip_model.safetensors",
            cache / "open_clip",
        ),
    ]
    assert sorted(p.name for p in vilt.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ]
    assert (
        "QuickGELU" not in err
    )  # the preset's ViT-B-32-quickgelu is the activation the weights were trained with
    # What the trainer checks at start accepts what was printed.
    sets = [line.split(" ", 1)[1] for line in out.splitlines()]
    W.check_available(apply_overrides(get_preset("vqa2-base"), sets).model)
    # The plain ViT-B-32 runs GELU on weights trained with QuickGELU: said, not hidden.
    assert (
        W.main(["--preset", "vqa2-base", "--clip-arch", "ViT-B-32", "--vilt", "none", "--cache", str(cache)])
        == 0
    )
    assert "QuickGELU" in capsys.readouterr().err


def test_nothing_to_fetch_and_bad_input_are_one_line(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VQA_WEIGHTS", str(tmp_path / "shared"))  # the Docker image's /checkpoints/weights
    assert W.default_cache() == tmp_path / "shared"
    monkeypatch.delenv("VQA_WEIGHTS")
    assert W.default_cache() == REPO / "weights"
    cache = ["--cache", str(tmp_path / "weights")]
    assert run_main(["--preset", "tiny", *cache], capsys) == (0, [], [])
    assert W.main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    rc, out, errors = run_main(["--vilt", "none", "--clip", "laion9000", *cache], capsys)
    assert (rc, out) == (2, []) and len(errors) == 1
    assert (
        "'laion9000' is not an open_clip pretrained tag of ViT-B-32-quickgelu (its tags: openai," in errors[0]
    )
    rc, _, errors = run_main(["--vilt", "none", "--clip", str(tmp_path / "missing.pt"), *cache], capsys)
    assert rc == 2 and errors == [f"error: --clip: no checkpoint file at '{tmp_path / 'missing.pt'}'"]
    # A repository the hub does not have: a failed download (exit 1), one line naming the option.
    rc, _, errors = run_main(["--vilt", "test-org/absent", "--clip", "none", *cache], capsys)
    assert rc == 1 and errors == [
        "error: --vilt test-org/absent: download from https://huggingface.co failed: 404 Client Error: repository test-org/absent not found"
    ]
    # A repository without the weights: not a ViLT checkpoint (the files it lacks named).
    hub.add("test-org/config-only", {"config.json": b"{}"})
    rc, _, errors = run_main(["--vilt", "test-org/config-only", "--clip", "none", *cache], capsys)
    assert rc == 2 and "has no model.safetensors or pytorch_model.bin" in errors[0] and len(errors) == 1


def test_launch_sh_fetch_weights_runs_the_module(checkout: Checkout) -> None:
    help_text = checkout.launch("fetch-weights", "--help")
    assert help_text.returncode == 0 and "Usage: ./launch.sh fetch-weights" in help_text.stdout
    assert checkout.dry("fetch-weights", "--preset", "vqa2-base", "--cache", "/mnt/weights") == [
        [
            f"{checkout.venv}/bin/python",
            "-m",
            "trainer.modeling.weights",
            "--preset",
            "vqa2-base",
            "--cache",
            "/mnt/weights",
        ]
    ]


# launch.sh with a fake, set-up virtual environment: tests/test_launch.py's fixture.
checkout = test_launch.checkout


# -- at the trainer's start ----------------------------------------------------------------------------------------


def test_a_checkpoint_missing_from_disk_stops_the_trainer_at_start_with_one_line(
    hub: FakeHub,
    tiny_easyvqa_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_launcher: pytest.MonkeyPatch,
) -> None:
    from trainer.main import main

    run_dir = tmp_path / "run"
    base = ["--preset", "tiny", "--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    cases = {
        "model.vilt_pretrained=dandelin/vilt-b32-mlm": "model.vilt_pretrained: 'dandelin/vilt-b32-mlm' is neither "
        "a folder nor in the Hugging Face cache; training never downloads: run `./launch.sh fetch-weights --vilt "
        "dandelin/vilt-b32-mlm --clip none` and add the --set lines it prints",
        f"model.vilt_pretrained={tmp_path}": f"model.vilt_pretrained: {tmp_path} has no config.json, no "
        "model.safetensors or pytorch_model.bin",
        "model.clip_pretrained=openai": "model.clip_pretrained: 'openai' is not an open_clip pretrained tag of "
        "ViT-tiny-8",
        f"model.clip_pretrained={tmp_path / 'clip.pt'}": f"model.clip_pretrained: no checkpoint file at "
        f"'{tmp_path / 'clip.pt'}'; training never downloads: give a local copy, e.g. one `./launch.sh "
        "fetch-weights` fetched",
    }
    for setting, message in cases.items():
        assert main([*base, "--set", setting]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), (setting, errors)
    settings = ["--set", "model.clip_arch=ViT-B-32", "--set", "model.clip_pretrained=openai"]
    assert main([*base, *settings]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "open_clip's 'openai' weights for ViT-B-32 are not in the Hugging Face cache" in error
    assert "run `./launch.sh fetch-weights --clip-arch ViT-B-32 --clip openai --vilt none`" in error
    # The preset's own checkpoints: the preset's own command (the first one missing is named).
    base[1] = "vqa2-base"
    assert main([*base, "--set", "train.micro_batch_size=8", "--set", "train.global_batch_size=8"]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error.startswith("error: model.vilt_pretrained: 'dandelin/vilt-b32-mlm' is neither a folder nor")
    assert "run `./launch.sh fetch-weights --preset vqa2-base` and add the --set lines" in error
    assert not run_dir.exists()  # stopped before writing anything


def test_the_trainer_sets_hf_hub_offline_before_the_hub_client_reads_it() -> None:
    env = clean_env()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    code = "import trainer.main, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr[-2000:]


# -- end to end: fetch, then train on what was fetched, offline -----------------------------------------------------


def save_tiny_checkpoints(hub: FakeHub, shards: Path, scratch: Path) -> tuple[Path, Path]:
    """A tiny ViLT (the tiny preset's sizes) with a WordPiece tokenizer of the easy-VQA questions, and a tiny
    open_clip ViT-tiny-8 state dict, published on the stand-in hub as test-org/tiny-vilt and test-org/tiny-clip."""
    import open_clip
    from transformers import ViltConfig, ViltModel

    from common.clip_configs import register_project_configs
    from data_pipeline.text import QuestionTokenizer
    from trainer.run.run_folder import shard_questions

    questions = list(shard_questions(str(shards / "train")))
    sizes = {"clip_arch": "ViT-tiny-8", "max_text_len": 16, "clip_context_length": 32}
    tokenizer = QuestionTokenizer.build(questions, scratch / "tokenizer", vocab_size=120, **sizes)
    vilt_dir = hub.root / "test-org" / "tiny-vilt"
    tokenizer.vilt.save_pretrained(vilt_dir)
    torch.manual_seed(123)
    vilt = ViltModel(
        ViltConfig(
            vocab_size=len(tokenizer.vilt),
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            image_size=64,
            patch_size=8,
            max_position_embeddings=40,
            max_image_length=-1,
        )
    )
    vilt.save_pretrained(vilt_dir)
    register_project_configs()
    clip = open_clip.create_model("ViT-tiny-8", force_image_size=64, force_context_length=32)
    clip_dir = hub.add("test-org/tiny-clip", {})
    torch.save(clip.state_dict(), clip_dir / "open_clip_pytorch_model.bin")
    return vilt_dir, clip_dir / "open_clip_pytorch_model.bin"


@pytest.mark.slow
def test_fetched_weights_train_offline_with_the_printed_lines(
    hub: FakeHub, tiny_easyvqa_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vilt_source, clip_source = save_tiny_checkpoints(hub, tiny_easyvqa_shards, tmp_path)
    cache = tmp_path / "weights"
    argv = ["--preset", "tiny", "--cache", str(cache), "--vilt", "test-org/tiny-vilt"]
    rc, out, errors = run_main([*argv, "--clip", "hf-hub:test-org/tiny-clip"], capsys)
    assert (rc, errors) == (0, []) and len(out) == 2
    # open_clip asked for the safetensors file first, then took the .bin the repository has.
    assert [c[2] for c in hub.calls if c[0] == "hf_hub_download"] == [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ]
    sets = [word for line in out for word in shlex.split(line)]
    assert all(str(cache) in s for s in sets[1::2])

    # The trainer, in a process of its own that has neither the hub nor HF_HUB_OFFLINE set nor a Hugging Face cache.
    env = clean_env({"HF_HOME": str(tmp_path / "empty-hf-home"), "OMP_NUM_THREADS": "1"})
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "trainer.main", "--preset", "tiny", *sets, "--max-steps", "2"]
    command += ["--set", "train.progress_bar=false", "--train-data", str(tiny_easyvqa_shards / "train")]
    result = subprocess.run(
        [*command, "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Two steps of AdamW move each weight by about the learning rate: still the fetched ones, not a random start.
    state = torch.load(
        run_dir / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    from safetensors.torch import load_file

    vilt = load_file(vilt_source / "model.safetensors")
    clip = torch.load(clip_source, map_location="cpu")
    pairs = {
        "embeddings.text_embeddings.word_embeddings.weight": vilt,
        "encoder.layer.0.attention.attention.query.weight": vilt,
        "visual.conv1.weight": clip,
    }
    for name, source in pairs.items():
        assert source[name].float().std() > 5e-3  # far from what two steps of this size could reach from zero
        [key] = [k for k in state if k.endswith(name) and (("clip." in k) == (source is clip))]
        torch.testing.assert_close(state[key].float(), source[name].float(), atol=2e-3, rtol=0, msg=key)
