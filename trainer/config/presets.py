"""Named run presets: each is a function returning a complete RunConfig (big_vision style).

`--preset NAME` picks one; `--set section.field=value` overrides any field afterwards. Every preset's default model
variant is `clip-infonce-dot`, the paper's proposal (model (3), eq. 2). Add presets in this module (a function with
`@register("name")`): `deepspeed trainer/main.py` runs the file, and only the presets defined here exist there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from trainer.config.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

PRESETS: dict[str, Callable[[], RunConfig]] = {}


def register(name: str) -> Callable[[Callable[[], RunConfig]], Callable[[], RunConfig]]:
    def deco(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        PRESETS[name] = fn
        return fn

    return deco


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (one of: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]()


@register("tiny")
def tiny() -> RunConfig:
    """Seconds-long runs that check the plumbing (tests, a first try of the commands): 2-layer ViLT of width 128, a
    tiny CLIP ViT, 64 px images. It learns nothing in its few steps (on easy-VQA it answers "yes" to every question,
    a flat val score of ~0.31); the `demo` preset is the one that learns."""
    return RunConfig(
        model=ModelConfig(
            variant="clip-infonce-dot",
            hidden_size=128,
            num_layers=2,
            num_heads=2,
            intermediate_size=512,
            patch_size=8,
            clip_arch="ViT-tiny-8",
            image_size=64,
            max_text_len=16,
            clip_context_length=32,
            wordpiece_vocab_size=200,
        ),
        loss=LossConfig(),
        data=DataConfig(loader="auto", num_workers=1, shuffle_buffer=64),
        optim=OptimConfig(),
        train=TrainConfig(
            global_batch_size=16,
            micro_batch_size=8,
            max_steps=50,
            log_every=5,
            eval_every=0,
            ckpt_every=0,
            keep_last=2,
        ),
    )


# VQA v2 train2014 + val2014 questions (v2_OpenEnded_mscoco_{train,val}2014_questions.json): ViLT fine-tunes on both.
VQA2_TRAINVAL_QUESTIONS = 443_757 + 214_354
VQA2_EPOCHS = 10
VQA2_BATCH = 256


@register("vqa2-base")
def vqa2_base() -> RunConfig:
    """ViLT-B/32 (768 x 12) fused with CLIP ViT-B/32 at 384 px on VQA v2, ViLT's fine-tuning recipe.

    10 epochs over train+val (658,111 questions) at batch 256 is 25,708 optimizer steps. The pretrained weights
    (ViLT's MLM checkpoint `dandelin/vilt-b32-mlm`, CLIP ViT-B/32's `openai` weights) are what the paper fine-tunes;
    `./launch.sh fetch-weights --preset vqa2-base` downloads them ahead of time into a cache the nodes share and prints
    the `--set` lines that point the run at it (README, "Pretrained weights"); `--set model.vilt_pretrained=none`
    trains ViLT from scratch. The architecture is open_clip's `ViT-B-32-quickgelu`: OpenAI trained these weights with
    QuickGELU, and open_clip's plain `ViT-B-32` (GELU) would run them with another activation.
    """
    steps = -(-VQA2_TRAINVAL_QUESTIONS * VQA2_EPOCHS // VQA2_BATCH)
    return RunConfig(
        model=ModelConfig(
            variant="clip-infonce-dot",
            vilt_pretrained="dandelin/vilt-b32-mlm",
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
            patch_size=32,
            clip_arch="ViT-B-32-quickgelu",
            clip_pretrained="openai",
            image_size=384,
            max_text_len=40,
            clip_context_length=77,
        ),
        loss=LossConfig(),
        data=DataConfig(loader="auto", num_workers=4, shuffle_buffer=4096),
        optim=OptimConfig(
            lr=1e-4, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-8, head_lr_mult=10.0, warmup_ratio=0.1
        ),
        train=TrainConfig(
            global_batch_size=VQA2_BATCH,
            micro_batch_size=32,
            max_steps=steps,
            log_every=50,
            eval_every=2000,
            ckpt_every=1000,
            keep_last=3,
        ),
    )


DEMO_STEPS = 800


@register("demo")
def demo() -> RunConfig:
    """The paper's comparison on easy-VQA in minutes (`./launch.sh demo`): tiny towers trained from scratch.

    Sized so that the demo's comparison (`baseline`, `clip-no-infonce`, `clip-infonce-cos`, `clip-infonce-dot`, each
    validated every 100 steps on 500 fixed test questions and scored on the whole test split at the end) finishes on
    a 2-core CPU in under 20 minutes, set-up included (the README's quick start has the measured times), with the
    CLIP variants above 0.90 on easy-VQA's test split:
    ViLT 2 layers x 128 with 8 heads of 16 and init std 0.1 (ViLT's BERT init, 0.02, leaves the image unused for
    hundreds of steps when training from scratch); CLIP's convolutional `RN-tiny` tower (open_clip's
    ModifiedResNet); 64 px images, 12-token questions (the longest easy-VQA question); batch 64, AdamW lr 7e-4 with
    ViLT's betas and the head at the body's rate (ViLT's x10 assumes a pretrained body), 800 steps. The compact CLIP
    token table keeps the BPE tokens of the training questions instead of 49,408 rows and changes no output.
    The experiments behind these settings (settings, seeds, scores): docs/demo_preset_search.md;
    `python -m trainer.tools.preset_search` reruns them.
    """
    base = tiny()
    return RunConfig(
        model=dataclasses.replace(
            base.model,
            num_heads=8,
            clip_arch="RN-tiny",
            init_std=0.1,
            max_text_len=12,
            clip_context_length=16,
            wordpiece_vocab_size=200,
            clip_text_vocab="compact",
        ),
        loss=LossConfig(),
        data=DataConfig(loader="auto", num_workers=1, shuffle_buffer=2048),
        optim=OptimConfig(lr=7e-4, head_lr_mult=1.0),
        train=TrainConfig(
            global_batch_size=64,
            micro_batch_size=64,
            max_steps=DEMO_STEPS,
            log_every=5,  # dense enough for the comparison's smoothing window (100 steps = 20 points)
            eval_every=DEMO_STEPS // 2,
            eval_batch_size=512,
            ckpt_every=DEMO_STEPS // 2,
            keep_last=1,
        ),
    )
