"""Model and losses as one module handed to the engine: forward(batch) returns the losses (only the logits for a
batch without targets: inference).

The training loop and DeepSpeed see only this module; they never know about ViLT or CLIP. The contrastive loss
all-gathers features across ranks inside forward, so every rank must run forward the same number of times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.config.config import ConfigError, LossConfig, ModelConfig, OptimConfig, RunConfig
from trainer.modeling.loss_names import LOSS_NAMES
from trainer.modeling.losses import global_contrastive_loss, vqa_loss
from trainer.modeling.model import FusedViltClip


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # As ViLT: no weight decay on biases and normalisation weights (all 1-D parameters here).
    return param.ndim < 2 or "norm" in name.lower() or ".ln_" in name or name.startswith("ln_")


class VQATask(nn.Module):
    """The fused model plus ViLT's VQA loss and (per variant) the contrastive alignment loss."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        *,
        n_answers: int,
        vilt_vocab_size: int,
        clip_vocab: list[int] | None = None,
    ):
        super().__init__()
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.model = FusedViltClip(
            model_cfg, n_answers=n_answers, vilt_vocab_size=vilt_vocab_size, clip_vocab=clip_vocab
        )
        if model_cfg.contrastive == "clip" and loss_cfg.duplicate_questions != "none":
            raise ConfigError(
                f"loss.duplicate_questions={loss_cfg.duplicate_questions} applies to the paper's InfoNCE variants, "
                f"not to {model_cfg.variant} (CLIP's symmetric loss)"
            )
        self.image_mean = self.model.image_mean
        self.image_std = self.model.image_std

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.model(batch["pixels"], batch["vilt_ids"], batch["vilt_mask"], batch.get("clip_ids"))
        logits = out["logits"]
        if (
            "targets" not in batch
        ):  # inference (trainer/serve/predictor.py): the answers' scores, no loss to compute
            return {"logits": logits}
        v_loss = vqa_loss(logits, batch["targets"])
        kind = self.model_cfg.contrastive
        if kind == "none":
            c_loss = torch.zeros((), device=logits.device)
            total = v_loss
        else:
            c_loss = global_contrastive_loss(
                out["image_features"], out["text_features"], temperature=self.loss_cfg.temperature, kind=kind,
                question_tokens=batch.get("clip_ids") if batch.get("clip_ids") is not None else batch["vilt_ids"],
                duplicates=self.loss_cfg.duplicate_questions,
            )  # fmt: skip
            total = v_loss + self.loss_cfg.infonce_weight * c_loss
        losses = dict(zip(LOSS_NAMES, (total, v_loss.detach(), c_loss.detach()), strict=True))
        return {**losses, "logits": logits}

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """AdamW parameter groups: VQA head at lr * head_lr_mult, CLIP at clip_lr (or frozen), no decay on norms."""
        clip_lr = optim.lr if optim.clip_lr is None else optim.clip_lr
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if name.startswith("clip."):
                if optim.freeze_clip:
                    param.requires_grad_(False)
                    continue
                part = "clip"
            elif name.startswith("classifier."):
                part = "head"
            else:
                part = "fusion"
            if param.requires_grad:
                groups.setdefault((part, _no_decay(name, param)), []).append(param)
        lrs = {"clip": clip_lr, "head": optim.lr * optim.head_lr_mult, "fusion": optim.lr}
        return [
            {
                "params": params,
                "lr": lrs[part],
                "weight_decay": 0.0 if no_decay else optim.weight_decay,
                "name": f"{part}{'_no_decay' if no_decay else ''}",
            }
            for (part, no_decay), params in sorted(groups.items())
        ]


def build_task(
    cfg: RunConfig, *, n_answers: int, vilt_vocab_size: int, clip_vocab: list[int] | None = None
) -> VQATask:
    """clip_vocab: the BPE ids kept by `model.clip_text_vocab=compact` (the question tokenizer's clip_vocab)."""
    return VQATask(
        cfg.model, cfg.loss, n_answers=n_answers, vilt_vocab_size=vilt_vocab_size, clip_vocab=clip_vocab
    )
