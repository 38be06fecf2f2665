"""Pretrained weights: fetch the checkpoints a preset names into a folder the nodes share, and check before training
that they are on local disk.

    python -m trainer.modeling.weights --preset vqa2-base --cache /mnt/weights      (what ./launch.sh fetch-weights runs)

Fetching needs the Hugging Face hub; training never does. ViLT (`model.vilt_pretrained`, a hub name such as
dandelin/vilt-b32-mlm) is downloaded with huggingface_hub's `snapshot_download` into CACHE/vilt/ORG--NAME (config,
tokenizer and weights only), CLIP (`model.clip_pretrained`, an open_clip pretrained tag of `model.clip_arch`, or
`hf-hub:ORG/NAME` for open_clip weights on the hub) with open_clip's own download into CACHE/open_clip (the hub
cache layout). huggingface_hub shows a progress bar per file and resumes an interrupted download where it stopped;
a file already complete is not fetched again. The command ends by printing the `--set` options that point the
trainer at the local copies, one per line on stdout; everything else goes to stderr.

Every network call gives up after `--timeout SECONDS` (default 60) without an answer (trainer/modeling/hub_timeouts.py): an
endpoint that accepts connections and never answers ends the command after about 2 x SECONDS + 1 s per file, with
one line naming the endpoint, exit 1.

`check_available` is what the trainer runs before start-up (trainer/main.py): a pretrained checkpoint that is not on
local disk (a folder, a file, or the Hugging Face cache) stops the run with one line naming `./launch.sh
fetch-weights`, since training runs with HF_HUB_OFFLINE=1 and never downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub import try_to_load_from_cache

from trainer.config.config import ConfigError, ModelConfig, apply_overrides
from trainer.config.presets import PRESETS, get_preset
from trainer.modeling.hub_timeouts import (
    DEFAULT_TIMEOUT_S,
    hub_endpoint,
    positive_seconds,
    set_timeout,
    timed_out,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "VQA_WEIGHTS"
FETCH_COMMAND = "./launch.sh fetch-weights"
HF_HUB_PREFIX = "hf-hub:"
# What the trainer reads from a ViLT checkpoint: config, tokenizer, weights (not the TF, Flax or ONNX copies).
VILT_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.bin"]
VILT_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
VILT_TOKENIZER = ("tokenizer.json", "vocab.txt")
CLIP_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class WeightsError(ConfigError):
    """A pretrained checkpoint that is named wrongly or missing from local disk; the message names the option."""


class FetchError(RuntimeError):
    """A download that failed (the hub unreachable, a repository or file that does not exist there)."""


def default_cache() -> Path:
    """$VQA_WEIGHTS, else weights/ in the repository."""
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / "weights")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _download_error(what: str, endpoint: str, exc: BaseException, timeout: float) -> FetchError:
    if timed_out(exc):
        return FetchError(
            f"{what}: {endpoint} did not answer within {timeout:g} s (--timeout SECONDS to wait longer; "
            f"HF_ENDPOINT names the hub): {_first_line(exc)}"
        )
    return FetchError(f"{what}: download from {endpoint} failed: {_first_line(exc)}")


# -- what is on local disk -----------------------------------------------------------------------------------------


def vilt_files_missing(folder: Path) -> list[str]:
    """What a ViLT checkpoint folder lacks for the trainer: its config, weights, tokenizer."""
    wanted = [("config.json",), VILT_WEIGHTS, VILT_TOKENIZER]
    return [" or ".join(names) for names in wanted if not any((folder / n).is_file() for n in names)]


def local_vilt(name: str) -> Path | None:
    """The folder `ViltModel.from_pretrained(name, local_files_only=True)` reads: `name` itself, or the snapshot of
    hub repository `name` in the Hugging Face cache; None when neither exists."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repository id either (e.g. a folder path that does not exist)
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def is_clip_file(pretrained: str) -> bool:
    """trainer/modeling/model.py's rule: a path (a slash, or a checkpoint suffix) rather than an open_clip tag."""
    return (
        "/" in pretrained
        and not pretrained.startswith(HF_HUB_PREFIX)
        or pretrained.endswith(CLIP_FILE_SUFFIXES)
    )


def clip_tag_config(arch: str, tag: str) -> dict:
    """open_clip's download entry for `tag` of architecture `arch`; a WeightsError listing the tags if none."""
    # open_clip (about 2 s to import) is imported where a CLIP tag is looked up or fetched, here and below: the
    # ViLT-only paths and --help do not wait for it.
    from open_clip import pretrained as oc

    from common.clip_configs import register_project_configs

    register_project_configs()
    cfg = oc.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = oc.list_pretrained_tags_by_model(arch)
        raise WeightsError(
            f"model.clip_pretrained: '{tag}' is not an open_clip pretrained tag of {arch} "
            f"(its tags: {', '.join(tags) or 'none'}; or give a local file, or hf-hub:ORG/NAME to fetch)"
        )
    return cfg


def local_clip_tag(arch: str, tag: str) -> Path | None:
    """Where open_clip finds the weights of `tag` without downloading (the Hugging Face cache); None if absent."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = clip_tag_config(arch, tag)
    if cfg.get("file"):
        return Path(cfg["file"]) if Path(cfg["file"]).is_file() else None
    model_id, filename = os.path.split(cfg.get("hf_hub", ""))
    if not model_id:
        return None
    # open_clip's order: a safetensors file of the same name first (HF_SAFE_WEIGHTS_NAME for the default name).
    name = filename or HF_WEIGHTS_NAME
    safe = HF_SAFE_WEIGHTS_NAME if name == HF_WEIGHTS_NAME else name.rsplit(".", 1)[0] + ".safetensors"
    for candidate in (safe, name):
        cached = try_to_load_from_cache(model_id, candidate)
        if isinstance(cached, str):
            return Path(cached)
    return None


def _fetch_advice(model: ModelConfig, preset: str | None, field: str) -> str:
    """The fetch-weights command that gets `field`'s checkpoint: the preset's own when it names the same one."""
    ours = get_preset(preset).model if preset in PRESETS else None
    same = ours is not None and getattr(ours, field) == getattr(model, field)
    if field == "vilt_pretrained":
        command = f"--preset {preset}" if same else f"--vilt {model.vilt_pretrained} --clip none"
    else:
        same = same and ours is not None and ours.clip_arch == model.clip_arch
        command = (
            f"--preset {preset}"
            if same
            else f"--clip-arch {model.clip_arch} --clip {model.clip_pretrained} --vilt none"
        )
    return (
        f"training never downloads: run `{FETCH_COMMAND} {command}` and add the --set lines it prints "
        f"(README.md, 'Pretrained weights')"
    )


def check_available(model: ModelConfig, preset: str | None = None) -> None:
    """Every pretrained checkpoint `model` names is on local disk; else one line naming `./launch.sh fetch-weights`
    (with the options that fetch it: `--preset PRESET` where the preset names the same checkpoint)."""
    local = f"training never downloads: give a local copy, e.g. one `{FETCH_COMMAND}` fetched"
    if model.vilt_pretrained:
        folder = local_vilt(model.vilt_pretrained)
        if folder is None:
            raise WeightsError(
                f"model.vilt_pretrained: '{model.vilt_pretrained}' is neither a folder nor in the Hugging Face "
                f"cache; {_fetch_advice(model, preset, 'vilt_pretrained')}"
            )
        missing = vilt_files_missing(folder)
        if missing:
            raise WeightsError(f"model.vilt_pretrained: {folder} has no {', no '.join(missing)}; {local}")
    pretrained = model.clip_pretrained
    if model.visual != "clip" or not pretrained:
        return
    if pretrained.startswith(HF_HUB_PREFIX):
        raise WeightsError(
            f"model.clip_pretrained: '{pretrained}' is a hub name, which training does not download; run "
            f"`{FETCH_COMMAND} --clip {pretrained} --vilt none` and use the file it prints"
        )
    if is_clip_file(pretrained):
        if not Path(pretrained).is_file():
            raise WeightsError(f"model.clip_pretrained: no checkpoint file at '{pretrained}'; {local}")
    elif local_clip_tag(model.clip_arch, pretrained) is None:
        raise WeightsError(
            f"model.clip_pretrained: open_clip's '{pretrained}' weights for {model.clip_arch} are not in the "
            f"Hugging Face cache; {_fetch_advice(model, preset, 'clip_pretrained')}"
        )


# -- fetching ------------------------------------------------------------------------------------------------------


def fetch_vilt(name: str, cache: Path, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """A local folder as it is, else hub repository `name` downloaded into CACHE/vilt/ORG--NAME; the folder."""
    path = Path(name).expanduser()
    if not path.is_dir():
        path = cache / "vilt" / name.replace("/", "--")
        print(f"fetch-weights: ViLT {name} -> {path}", file=sys.stderr, flush=True)
        try:
            huggingface_hub.snapshot_download(name, local_dir=path, allow_patterns=VILT_PATTERNS)
        except ValueError as exc:  # not a repository id (HFValidationError)
            raise WeightsError(
                f"--vilt '{name}': neither a folder nor a hub name ({_first_line(exc)})"
            ) from None
        except Exception as exc:  # network, authentication, a repository that does not exist
            raise _download_error(f"--vilt {name}", hub_endpoint(), exc, timeout) from None
    missing = vilt_files_missing(path)
    if missing:
        raise WeightsError(f"--vilt {name}: {path} has no {', no '.join(missing)}: not a ViLT checkpoint")
    return path.resolve()


def fetch_clip(arch: str, pretrained: str, cache: Path, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """A local file as it is, else open_clip's weights (tag of `arch`, or hf-hub:ORG/NAME) in CACHE/open_clip."""
    if is_clip_file(pretrained):
        if not Path(pretrained).is_file():
            raise WeightsError(f"--clip: no checkpoint file at '{pretrained}'")
        return Path(pretrained).resolve()
    from open_clip import pretrained as oc

    target = str(cache / "open_clip")
    print(f"fetch-weights: CLIP {arch} {pretrained} -> {target}", file=sys.stderr, flush=True)
    endpoint = hub_endpoint()
    try:
        if pretrained.startswith(HF_HUB_PREFIX):
            file = oc.download_pretrained_from_hf(pretrained[len(HF_HUB_PREFIX) :], cache_dir=target)
        else:
            cfg = clip_tag_config(arch, pretrained)
            _warn_tag_differences(arch, pretrained, cfg)
            if cfg.get("url") and not cfg.get("hf_hub"):  # open_clip fetches such a tag from its URL
                endpoint = cfg["url"]
            file = oc.download_pretrained(cfg, cache_dir=target)
    except WeightsError:
        raise
    except Exception as exc:
        raise _download_error(f"--clip {pretrained}", endpoint, exc, timeout) from None
    if not file or not Path(file).is_file():
        raise FetchError(f"--clip {pretrained}: open_clip returned no file for {arch}")
    return Path(file).resolve()


def _warn_tag_differences(arch: str, tag: str, cfg: dict) -> None:
    """A file loads with the architecture's own settings, a tag with the tag's: say where they differ."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    notes = []
    arch_quick_gelu = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if bool(cfg.get("quick_gelu", False)) != arch_quick_gelu:
        act = "QuickGELU" if cfg.get("quick_gelu") else "GELU"
        notes.append(
            f"the '{tag}' weights were trained with {act} and {arch} uses the other activation (loading the "
            f"tag does the same; open_clip warns about it)"
        )
    defaults = PreprocessCfg()
    for key in ("mean", "std"):
        if key in cfg and tuple(cfg[key]) != tuple(getattr(defaults, key)):
            notes.append(
                f"the tag normalises images with {key} {tuple(cfg[key])}, a file with {getattr(defaults, key)}"
            )
    for note in notes:
        print(f"fetch-weights: note: {note}", file=sys.stderr)


# -- the command ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.modeling.weights",
        description=(
            "Download the pretrained checkpoints a preset names (model.vilt_pretrained, model.clip_pretrained) "
            "into a cache folder shared by the nodes, then print the --set options that point training at the "
            "local copies. Resumes an interrupted download; files already complete are kept. Needs the Hugging "
            "Face hub; training does not. ./launch.sh fetch-weights runs this."
        ),
    )
    p.add_argument(
        "--preset", default="vqa2-base", help="the preset whose weights to fetch (default vqa2-base)"
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        help=f"where to put them, a folder every node reads at the same path (default ${CACHE_ENV}, else weights/ "
        "in the repository)",
    )
    p.add_argument(
        "--vilt", metavar="NAME", help="ViLT hub name or folder instead of the preset's ('none': skip)"
    )
    p.add_argument(
        "--clip",
        metavar="TAG",
        help="CLIP weights instead of the preset's: an open_clip tag of the architecture, hf-hub:ORG/NAME, or a "
        "file ('none': skip)",
    )
    p.add_argument("--clip-arch", metavar="ARCH", help="open_clip architecture instead of the preset's")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up on a network call after SECONDS without an answer (default {DEFAULT_TIMEOUT_S:g}; "
        "huggingface_hub retries a timed-out request up to 5 times)",
    )
    return p


def _model(args: argparse.Namespace) -> ModelConfig:
    overrides = [f"model.vilt_pretrained={args.vilt}"] if args.vilt is not None else []
    if args.clip_arch is not None:
        overrides.append(f"model.clip_arch={args.clip_arch}")
    cfg = apply_overrides(get_preset(args.preset), overrides)
    # hf-hub:ORG/NAME is a name for fetching only (the trainer loads the file it becomes): not a config value.
    clip = (
        cfg.model.clip_pretrained
        if args.clip is None
        else (None if args.clip.lower() == "none" else args.clip)
    )
    return dataclasses.replace(cfg.model, clip_pretrained=clip)


def set_line(field: str, value: str | Path) -> str:
    return shlex.join(["--set", f"model.{field}={value}"])


def fetch(args: argparse.Namespace) -> list[str]:
    """Fetch what the preset (with the overrides) names; the --set lines for the trainer."""
    model = _model(args)
    cache = Path(args.cache).expanduser() if args.cache else default_cache()
    cache = cache.resolve()
    lines = []
    if args.clip_arch is not None:
        lines.append(set_line("clip_arch", model.clip_arch))
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT_S)
    if model.vilt_pretrained:
        lines.append(set_line("vilt_pretrained", fetch_vilt(model.vilt_pretrained, cache, timeout)))
    if model.visual == "clip" and model.clip_pretrained:
        clip = fetch_clip(model.clip_arch, model.clip_pretrained, cache, timeout)
        lines.append(set_line("clip_pretrained", clip))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 fetched (or nothing to fetch), 1 a download failed, 2 bad input."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own one-line message (exit 2)
        return int(exc.code or 0)
    restore = set_timeout(args.timeout)
    try:
        lines = fetch(args)
    except ConfigError as exc:  # WeightsError included: bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        restore()
    if not lines:
        print(
            f"fetch-weights: preset {args.preset} names no pretrained weights: nothing to fetch",
            file=sys.stderr,
        )
        return 0
    print("fetch-weights: done; add these options to the training command of every node:", file=sys.stderr)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
