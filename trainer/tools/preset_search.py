"""Fast preset search on easy-VQA: the project's model, losses, parameter groups and schedule in a plain loop.

Choosing the `demo` preset needs dozens of short trainings, each judged by the test score per question type
(easy-VQA's shape questions are learned last). Running each through the whole stack would cost minutes of set-up per
trial; here the data set sits in device memory as tensors, each step is the training step without DeepSpeed
(trainer/engine/plain.py: AdamW with ViLT's warm-up and linear decay), and one JSON line per run says what was learned when.

    python -m trainer.tools.preset_search --variant clip-no-infonce --set optim.lr=7e-4 --seed 1 --evals 400,600
    python -m trainer.tools.preset_search --clip-vision width=24 --device cuda       # a wider CLIP tower, derived
    python -m trainer.tools.preset_search --grid trials.txt --jobs 12 --out search.jsonl   # one run per line, K at once

What it does not measure: wall time of the real stack (loader, DeepSpeed engine); time the chosen preset with
`./launch.sh demo` afterwards. The data order is a seeded permutation per epoch, not the shard loader's order, so a
seed here and the same seed in the stack are different draws: judge settings over several seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.convert.easyvqa import answer_list
from trainer.config.config import apply_overrides
from trainer.config.presets import get_preset
from trainer.engine.plain import PlainEngine
from trainer.run import run_folder
from trainer.run.run_folder import RunFolder

QUESTION_TYPES = ("yes/no", "colour", "shape")
SHAPES = ("circle", "rectangle", "triangle")


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "colour"


def derive_clip_arch(base_arch: str, vision: list[str]) -> str:
    """Register an open_clip config equal to `base_arch` but for the given vision_cfg fields; returns its name."""
    # open_clip (about 2 s to import) only where a CLIP architecture is derived.
    import open_clip

    from common.clip_configs import register_project_configs

    register_project_configs()
    cfg = open_clip.get_model_config(base_arch)
    if cfg is None:
        raise SystemExit(f"preset_search: error: --clip-vision: no open_clip config named '{base_arch}'")
    for item in vision:
        key, sep, value = item.partition("=")
        if not sep or key not in cfg["vision_cfg"]:
            raise SystemExit(
                f"preset_search: error: --clip-vision '{item}': expected FIELD=VALUE with FIELD one of "
                f"{', '.join(cfg['vision_cfg'])}"
            )
        cfg["vision_cfg"][key] = json.loads(f"[{value}]") if "," in value else json.loads(value)
    name = f"{base_arch}-search-{os.getpid()}"
    folder = Path(tempfile.mkdtemp(prefix="clip_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return name


class EasyVQATensors:
    """One easy-VQA split as tensors: uint8 images, answer indices, image ids, tokenised questions."""

    def __init__(self, split: str, tokenizer: Any, answers: list[str], image_size: int, device: torch.device):
        # easy_vqa where the data is read, here and below, as data_pipeline/convert/easyvqa.py does: an optional package,
        # reported when missing.
        import easy_vqa

        questions, answer_text, image_ids = (
            easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
        )
        paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
        size = (image_size, image_size)
        images = np.stack(
            [
                np.asarray(Image.open(paths[i]).convert("RGB").resize(size, Image.BICUBIC))
                for i in range(len(paths))
            ]
        )
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        self.answers = torch.tensor([answers.index(a) for a in answer_text], device=device)
        self.image_ids = torch.tensor(image_ids, device=device)
        self.tokens = {k: v.to(device) for k, v in tokenizer(list(questions)).items()}
        self.types = np.array([question_type(a) for a in answer_text])
        self.n_answers = len(answers)

    def __len__(self) -> int:
        return len(self.answers)

    def batch(self, idx: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = (self.images[self.image_ids[idx]].float() / 255 - mean) / std
        targets = torch.zeros(len(idx), self.n_answers, device=idx.device)
        targets[torch.arange(len(idx), device=idx.device), self.answers[idx]] = 1.0
        return {"pixels": pixels, "targets": targets} | {k: v[idx] for k, v in self.tokens.items()}


@torch.no_grad()
def score(
    task: Any, data: EasyVQATensors, limit: int, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, float]:
    """Accuracy (= VQA score: easy-VQA has one answer per question) overall and per question type."""
    task.eval()
    n = min(limit, len(data)) if limit else len(data)
    device = data.answers.device
    preds = []
    for start in range(0, n, 2048):
        b = data.batch(torch.arange(start, min(start + 2048, n), device=device), mean, std)
        out = task.model(b["pixels"], b["vilt_ids"], b["vilt_mask"], b.get("clip_ids"))
        preds.append(out["logits"].argmax(-1))
    task.train()
    ok = (torch.cat(preds) == data.answers[:n]).cpu().numpy()
    types = data.types[:n]
    result = {"all": round(float(ok.mean()), 4)}
    result |= {t: round(float(ok[types == t].mean()), 4) for t in QUESTION_TYPES if (types == t).any()}
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = [f"model.variant={args.variant}", *args.set]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = apply_overrides(get_preset(args.preset), overrides)
    if args.clip_vision:
        cfg = apply_overrides(
            cfg, [f"model.clip_arch={derive_clip_arch(cfg.model.clip_arch, args.clip_vision)}"]
        )
    m = cfg.model
    with tempfile.TemporaryDirectory() as tmp:
        import easy_vqa

        # A run folder of its own (config, answers, a vocabulary built from the training questions with the CLIP
        # ids they use), from which the task is built as every command builds it.
        folder = RunFolder(tmp)
        folder.save(cfg, answers=answer_list())
        built = dataclasses.replace(m, vilt_pretrained=None)
        questions = easy_vqa.get_train_questions()[0]
        run_folder.build_tokenizer(built, folder.tokenizer_dir, lambda: questions, fit_clip_vocab=True)
        cfg, tokenizer, answers, task = run_folder.load(folder, config=cfg)
    task = task.to(device)
    train = EasyVQATensors("train", tokenizer, answers, m.image_size, device)
    test = EasyVQATensors("test", tokenizer, answers, m.image_size, device)
    mean = torch.tensor(task.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(task.image_std, device=device).view(1, 3, 1, 1)
    engine = PlainEngine(
        task, cfg, device, bf16=False
    )  # fp32 weights and compute on every device, no autocast
    steps, batch_size = cfg.train.max_steps, cfg.train.global_batch_size
    evals = {int(s) for s in args.evals.split(",") if s} | {steps}
    order = torch.Generator().manual_seed(args.seed)
    perm, pos = torch.randperm(len(train), generator=order), 0
    log: list[dict[str, Any]] = []
    train_time = 0.0
    for step in range(steps):
        if pos + batch_size > len(perm):  # a new epoch: a new permutation, the remainder dropped
            perm, pos = torch.randperm(len(train), generator=order), 0
        idx = perm[pos : pos + batch_size].to(device)
        pos += batch_size
        start = time.perf_counter()
        out = engine.forward(train.batch(idx, mean, std))
        engine.backward(out["loss"])
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - start
        if step + 1 in evals:
            entry = {"step": step + 1, "loss": round(out["vqa_loss"].item(), 4)}
            entry["test"] = score(task, test, args.eval_limit, mean, std)
            entry["train"] = score(task, train, args.eval_limit or 9600, mean, std)
            log.append(entry)
            if args.verbose:
                print(json.dumps(entry), file=sys.stderr, flush=True)
    return {
        "preset": args.preset,
        "variant": args.variant,
        "set": args.set,
        "clip_vision": args.clip_vision,
        "seed": args.seed,
        "steps": steps,
        "batch": batch_size,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "samples_per_s": round(steps * batch_size / train_time, 1),
        "evals": log,
    }


def run_grid(args: argparse.Namespace) -> int:
    """Every non-comment line of --grid is one run's arguments; --jobs runs at once; results appended to --out."""
    lines = [line.strip() for line in Path(args.grid).read_text().splitlines()]
    runs = [line for line in lines if line and not line.startswith("#")]
    if not runs:
        raise SystemExit(f"preset_search: error: --grid {args.grid}: no runs in the file")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    pending, running, failed = list(enumerate(runs)), [], 0
    while pending or running:
        while pending and len(running) < args.jobs:
            i, line = pending.pop(0)
            cmd = [
                sys.executable,
                "-m",
                "trainer.tools.preset_search",
                "--device",
                args.device,
                *shlex.split(line),
            ]
            running.append(
                (
                    i,
                    line,
                    subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
                )
            )
        time.sleep(0.2)
        for entry in [r for r in running if r[2].poll() is not None]:
            running.remove(entry)
            i, line, proc = entry
            stdout, stderr = proc.communicate()
            if proc.returncode == 0 and stdout.strip():
                with out.open("a") as f:
                    f.write(stdout.strip().splitlines()[-1] + "\n")
                print(f"run {i + 1}/{len(runs)} done: {line}", file=sys.stderr, flush=True)
            else:
                failed += 1
                last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
                print(f"run {i + 1}/{len(runs)} FAILED: {line}: {last}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.tools.preset_search",
        description=__doc__.split("\n\n")[0]
        + " One JSON line per run on stdout (or appended to --out with --grid).",
    )
    p.add_argument("--preset", default="demo", help="preset to start from (default: demo)")
    p.add_argument("--variant", default="clip-no-infonce", help="model variant (default: clip-no-infonce)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field"
    )
    p.add_argument(
        "--clip-vision",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="train a CLIP tower derived from the preset's, with this vision_cfg field changed (e.g. width=24)",
    )
    p.add_argument(
        "--steps", type=int, help="optimizer steps (= --set train.max_steps=N; default: the preset's)"
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order (default: 0)")
    p.add_argument("--evals", default="", help="comma-separated steps to score at besides the last")
    p.add_argument(
        "--eval-limit", type=int, default=0, help="score only the first N questions (default: all)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--verbose", action="store_true", help="print each evaluation to stderr as it happens")
    p.add_argument("--grid", metavar="FILE", help="run every line of FILE (one run's arguments per line)")
    p.add_argument("--jobs", type=int, default=1, help="with --grid: runs at once (default: 1)")
    p.add_argument(
        "--out", default="preset_search.jsonl", help="with --grid: results file (default: %(default)s)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("preset_search: error: --jobs must be >= 1")
    if args.grid:
        return run_grid(args)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
