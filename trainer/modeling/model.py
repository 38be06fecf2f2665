"""The fused ViLT + CLIP model and the ViLT baseline, built from the run configuration.

Paper models (see docs/model.md): `baseline` is ViLT with its own patch projection; the `clip-*` variants replace that visual
embedding by CLIP's image encoder, whose patch tokens (with the class token) are projected to ViLT's hidden size and
fused with the question by ViLT's transformer. CLIP also encodes the question, so that its image feature I and text
feature T can be aligned by InfoNCE before fusion.

transformers' ViLT modules and open_clip's models are reused as they are, under their own parameter names, so that
pretrained checkpoints of either load unchanged. Two things are replaced: the fusion encoder's self-attention runs
through `F.scaled_dot_product_attention` (the stock module materialises the attention matrix), and the baseline's
visual embedding is vectorised (the stock one loops over the samples in Python to sample patches; with full-size
images and no patch limit its output is the same up to token order, which attention does not see).

Two things make a sample cheaper without changing its outputs (tests/test_model_trim.py, float64):
- both patch stems (CLIP's `visual.conv1`, the baseline's patch projection) run as one matrix product
  (trainer/modeling/patch_stem.py), same parameters;
- the text runs at the length the questions need (`set_text_lengths`, from the data at start-up or
  model.text_len / model.clip_text_len): ids and masks are cut to it and the position tables are read up to it,
  never interpolated (checkpoints keep the full tables). A question that fits gives the same outputs, because
  ViLT masks its padding keys and pools at [CLS], and CLIP's text attention is causal and pools at end-of-text.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ViltConfig, ViltModel
from transformers.models.vilt.modeling_vilt import ViltSelfAttention

from common.clip_configs import register_project_configs
from common.errors import BadInputError
from trainer.config.config import ModelConfig
from trainer.modeling.patch_stem import as_matmul

log = logging.getLogger(__name__)

VILT_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class ModelBuildError(BadInputError, ValueError):
    """A model that cannot be built as configured; the message names the option or path to fix."""


class SdpaViltSelfAttention(ViltSelfAttention):
    """ViLT self-attention through scaled_dot_product_attention; same parameters (query/key/value) as the stock one.

    Takes a boolean mask broadcastable to [B, heads, N, N] (True = attend) so fused kernels can be used.
    """

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, output_attentions: bool = False
    ):
        if output_attentions:
            raise ValueError(
                "SdpaViltSelfAttention does not return attention weights; use model.attention=eager"
            )
        b, n, _ = hidden_states.shape
        shape = (b, n, self.num_attention_heads, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0
        )
        return (out.transpose(1, 2).reshape(b, n, self.all_head_size),)


def _vilt_config(cfg: ModelConfig, vocab_size: int) -> ViltConfig:
    return ViltConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        max_position_embeddings=max(40, cfg.max_text_len),
        max_image_length=-1,
        initializer_range=cfg.init_std,
    )


def load_vilt(cfg: ModelConfig, vocab_size: int) -> ViltModel:
    """ViLT from a checkpoint directory / cached hub name, or randomly initialised from the configured size."""
    if cfg.vilt_pretrained is None:
        return ViltModel(_vilt_config(cfg, vocab_size))
    try:
        # local_files_only: nothing here reaches the network; a hub name must already be in the local cache.
        model = ViltModel.from_pretrained(cfg.vilt_pretrained, local_files_only=True)
    except OSError as exc:
        raise ModelBuildError(
            f"model.vilt_pretrained: cannot load ViLT from '{cfg.vilt_pretrained}' "
            f"({str(exc).splitlines()[0][:160]}). Pass a directory written by save_pretrained, or fetch the "
            f"checkpoint beforehand with `./launch.sh fetch-weights` (README.md, 'Pretrained weights')."
        ) from None
    if model.config.vocab_size != vocab_size:
        raise ModelBuildError(
            f"model.vilt_pretrained: checkpoint vocabulary has {model.config.vocab_size} tokens but the question "
            f"tokenizer has {vocab_size}; use the checkpoint's own tokenizer"
        )
    return model


def load_clip(cfg: ModelConfig) -> nn.Module:
    """An open_clip model by architecture name, random or with weights from a pretrained tag or local file."""
    # open_clip (about 2 s to import) is imported where a CLIP tower is built, here and below: the baseline variant
    # never needs it.
    import open_clip

    register_project_configs()
    known = open_clip.list_models()
    if cfg.clip_arch not in known:
        raise ModelBuildError(
            f"model.clip_arch: '{cfg.clip_arch}' is not an open_clip architecture; valid: {', '.join(known)}"
        )
    pretrained = cfg.clip_pretrained
    if pretrained is not None and (
        "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    ):
        if not Path(pretrained).is_file():
            raise ModelBuildError(
                f"model.clip_pretrained: no checkpoint file at '{pretrained}' "
                f"(pass a local file saved with torch.save(model.state_dict()), or fetch open_clip's weights with "
                f"`./launch.sh fetch-weights`)"
            )
    try:
        model = open_clip.create_model(
            cfg.clip_arch,
            pretrained=pretrained,
            force_image_size=cfg.image_size,
            force_context_length=cfg.clip_context_length,
        )
    except RuntimeError as exc:
        raise ModelBuildError(
            f"model.clip_pretrained: cannot load '{pretrained}' for {cfg.clip_arch}: {str(exc).splitlines()[0][:200]} "
            f"(training never downloads: fetch the weights with `./launch.sh fetch-weights`)"
        ) from None
    # open_clip's logit_scale is a 0-dim parameter, which DeepSpeed cannot broadcast; this model takes its
    # temperature from the loss config instead, so the parameter is dropped.
    model.logit_scale = None
    if getattr(model, "logit_bias", None) is not None:
        model.logit_bias = None
    return model


def _drop_text_tower(clip: nn.Module) -> None:
    """Variants without a contrastive loss never run CLIP's text tower: drop it so no parameter goes unused."""
    for name in ("transformer", "token_embedding", "ln_final"):
        if hasattr(clip, name):
            setattr(clip, name, None)
    for name in ("positional_embedding", "text_projection"):
        if hasattr(clip, name):
            setattr(clip, name, None)
    if hasattr(clip, "text"):  # custom-text towers (HF text models)
        clip.text = None


class CompactTokenEmbedding(nn.Module):
    """CLIP's token embedding restricted to a known set of BPE ids (`model.clip_text_vocab=compact`).

    Takes the same full-vocabulary ids as the table it replaces and maps them to its rows inside, so open_clip's
    encode_text is unchanged (it pools at the EOT token by argmax over the raw ids). Row 0 stands for every id not
    in the set (a question word never seen in training). Rows start as copies of the full table's rows: pretrained
    weights carry over, and a random start has the same distribution.
    """

    def __init__(self, full: nn.Embedding, token_ids: list[int]) -> None:
        super().__init__()
        ids = sorted(set(token_ids))
        if not ids or ids[0] < 0 or ids[-1] >= full.num_embeddings:
            raise ModelBuildError(
                f"model.clip_text_vocab=compact: token ids must lie in 0..{full.num_embeddings - 1}"
            )
        index = torch.zeros(full.num_embeddings, dtype=torch.long)
        index[torch.tensor(ids)] = torch.arange(1, len(ids) + 1)
        # Part of the state dict, so a checkpoint says which ids its rows belong to and loading checks the size.
        self.register_buffer("index", index)
        rows = torch.cat([full.weight.detach().mean(0, keepdim=True), full.weight.detach()[ids]])
        self.weight = nn.Parameter(rows.clone())

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(self.index[ids], self.weight)


def clip_text_trimmable(clip: nn.Module) -> bool:
    """Whether CLIP's text tower gives the same feature for a question cut after its end-of-text token: a causal
    tower with its own token table and position table that pools at end-of-text (open_clip's CLIP class)."""
    return (
        getattr(clip, "token_embedding", None) is not None
        and isinstance(getattr(clip, "positional_embedding", None), Tensor)
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", None) in ("argmax", "eos")
    )


def encode_clip_text(clip: nn.Module, ids: Tensor) -> Tensor:
    """open_clip's CLIP.encode_text for ids of any length up to the context length: the position table and the
    causal mask are read up to the ids' length (open_clip adds the whole table, so it needs full-length ids)."""
    from open_clip.transformer import text_global_pool

    n = ids.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(ids).to(cast_dtype)
    x = x + clip.positional_embedding[:n].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
    x = clip.ln_final(x)
    x = text_global_pool(x, ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is not None:
        x = (
            clip.text_projection(x)
            if isinstance(clip.text_projection, nn.Linear)
            else x @ clip.text_projection
        )
    return x


class FusedViltClip(nn.Module):
    """ViLT fusion over either ViLT's own patch embedding (baseline) or CLIP's image tokens (clip-* variants).

    forward returns the VQA logits and, for the CLIP variants, CLIP's image and text features (I, T).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        n_answers: int,
        vilt_vocab_size: int,
        clip_vocab: list[int] | None = None,
    ) -> None:
        super().__init__()
        if n_answers < 1:
            raise ModelBuildError(f"n_answers must be >= 1, got {n_answers}")
        self.cfg = cfg
        self.vilt = load_vilt(cfg, vilt_vocab_size)
        h = self.vilt.config.hidden_size
        if cfg.attention == "sdpa":
            for layer in self.vilt.encoder.layer:
                stock = layer.attention.attention
                sdpa = SdpaViltSelfAttention(self.vilt.config)
                sdpa.load_state_dict(stock.state_dict())
                layer.attention.attention = sdpa
        self.clip: nn.Module | None = None
        if cfg.visual == "clip":
            self.clip = load_clip(cfg)
            if isinstance(getattr(self.clip.visual, "conv1", None), nn.Conv2d):
                self.clip.visual.conv1 = as_matmul(self.clip.visual.conv1)
            if cfg.contrastive == "none":
                _drop_text_tower(self.clip)
                self.clip.visual.proj = None  # I is only used by the contrastive loss
            elif cfg.compact_clip_vocab:
                if not clip_vocab:
                    raise ModelBuildError(
                        "model.clip_text_vocab=compact needs the question tokenizer's CLIP vocabulary "
                        "(QuestionTokenizer.clip_vocab, fitted on the training questions)"
                    )
                if not isinstance(getattr(self.clip, "token_embedding", None), nn.Embedding):
                    raise ModelBuildError(
                        f"model.clip_text_vocab=compact: {cfg.clip_arch} has no CLIP token table to compact"
                    )
                self.clip.token_embedding = CompactTokenEmbedding(self.clip.token_embedding, clip_vocab)
            # The baseline's patch projection is not used by the CLIP variants: drop it (no unused parameters).
            emb = self.vilt.embeddings
            emb.patch_embeddings = None
            emb.cls_token = None
            emb.position_embeddings = None
            self.visual_proj = nn.Linear(self._clip_token_width(), h)
            self.image_mean = tuple(self.clip.visual.image_mean)
            self.image_std = tuple(self.clip.visual.image_std)
        else:
            patches = self.vilt.embeddings.patch_embeddings
            patches.projection = as_matmul(patches.projection)
            self.image_mean, self.image_std = VILT_MEAN_STD
        # Same layout and names as transformers' ViltForQuestionAnswering.classifier, so its weights load.
        self.classifier = nn.Sequential(
            nn.Linear(h, 2 * h), nn.LayerNorm(2 * h), nn.GELU(), nn.Linear(2 * h, n_answers)
        )
        self.classifier.apply(self.vilt._init_weights)
        # Lengths the text runs at (None: the ids' own length); configured, or set from the data at start-up.
        self.vilt_text_len: int | None = None
        self.clip_text_len: int | None = None
        self.set_text_lengths(cfg.text_len or None, cfg.clip_text_len or None)

    def set_text_lengths(self, vilt: int | None, clip: int | None) -> None:
        """Run ViLT's text at `vilt` tokens and CLIP's at `clip` (None: as long as the ids come). Longer ids are cut
        (the caller reports questions that do not fit); shorter ones are used as they are."""
        for name, value, limit in (
            ("model.text_len", vilt, self.vilt.embeddings.text_embeddings.position_ids.shape[1]),
            ("model.clip_text_len", clip, self._clip_context()),
        ):
            if value is not None and not 1 <= value <= (limit or value):
                raise ModelBuildError(f"{name}: {value} is not in 1..{limit} (the model's position table)")
        self.vilt_text_len = vilt
        # CLIP's text is cut only where the feature stays the same (a causal tower pooling at end-of-text).
        self.clip_text_len = clip if self.clip is not None and clip_text_trimmable(self.clip) else None

    def _clip_context(self) -> int | None:
        table = getattr(self.clip, "positional_embedding", None) if self.clip is not None else None
        return table.shape[0] if isinstance(table, Tensor) else None

    def _clip_token_width(self) -> int:
        visual = self.clip.visual
        was_training = visual.training
        visual.eval()  # a one-image probe through BatchNorm (convolutional towers) needs eval mode
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size)
            width = self._clip_image_tokens(probe)[0].shape[-1]
        visual.train(was_training)
        return width

    def _clip_image_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """CLIP image tokens [B, N, C] (class token first where the tower has one) and pooled feature I [B, D]."""
        out = self.clip.visual.forward_intermediates(
            pixels, indices=1, normalize_intermediates=True, output_fmt="NCHW", output_extra_tokens=True
        )
        tokens = out["image_intermediates"][-1]
        if tokens.ndim == 4:  # NCHW feature map (ViT reshaped, or a convolutional tower)
            tokens = tokens.flatten(2).transpose(1, 2)
        prefix = out.get("image_intermediates_prefix")
        if prefix:
            tokens = torch.cat([prefix[-1], tokens], dim=1)
        return tokens, out["image_features"]

    def _vilt_visual_embed(self, pixels: Tensor) -> Tensor:
        """ViLT's patch embedding with interpolated position embeddings, vectorised over the batch."""
        emb = self.vilt.embeddings
        x = emb.patch_embeddings(pixels)  # [B, h, gh, gw]
        b, c, gh, gw = x.shape
        grid = self.vilt.config.image_size // self.vilt.config.patch_size
        spatial = emb.position_embeddings[:, 1:, :].transpose(1, 2).reshape(1, c, grid, grid)
        pos = F.interpolate(spatial, size=(gh, gw), mode="bilinear", align_corners=True)
        x = x.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
        cls = (emb.cls_token + emb.position_embeddings[:, :1, :]).expand(b, -1, -1)
        return emb.dropout(torch.cat([cls, x], dim=1))

    def forward(
        self, pixels: Tensor, vilt_ids: Tensor, vilt_mask: Tensor, clip_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        emb = self.vilt.embeddings
        if self.vilt_text_len is not None and vilt_ids.shape[1] > self.vilt_text_len:
            vilt_ids, vilt_mask = vilt_ids[:, : self.vilt_text_len], vilt_mask[:, : self.vilt_text_len]
        text = emb.text_embeddings(input_ids=vilt_ids)
        out: dict[str, Tensor] = {}
        if self.clip is None:
            image = self._vilt_visual_embed(pixels)
        else:
            tokens, out["image_features"] = self._clip_image_tokens(pixels)
            image = self.visual_proj(tokens)
            if self.cfg.contrastive != "none":
                if self.clip_text_len is None:
                    out["text_features"] = self.clip.encode_text(clip_ids)
                else:
                    out["text_features"] = encode_clip_text(self.clip, clip_ids[:, : self.clip_text_len])
        text = text + emb.token_type_embeddings(torch.zeros_like(vilt_ids))
        image = image + emb.token_type_embeddings.weight[1]
        x = torch.cat([text, image], dim=1)
        keep = torch.cat([vilt_mask.bool(), vilt_mask.new_ones(image.shape[:2], dtype=torch.bool)], dim=1)
        if self.cfg.attention == "sdpa":
            mask = keep[:, None, None, :]
        else:  # the stock attention adds a float mask to its scores
            mask = (~keep[:, None, None, :]).to(x.dtype) * torch.finfo(x.dtype).min
        for layer in self.vilt.encoder.layer:
            x = layer(x, mask)[0]
        pooled = self.vilt.pooler(self.vilt.layernorm(x))
        out["logits"] = self.classifier(pooled)
        return out


__all__ = [
    "CompactTokenEmbedding",
    "FusedViltClip",
    "ModelBuildError",
    "SdpaViltSelfAttention",
    "clip_text_trimmable",
    "encode_clip_text",
    "load_clip",
    "load_vilt",
]
