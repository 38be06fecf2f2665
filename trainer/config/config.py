"""Typed configuration of a run: model, loss, data, optimisation and loop cadence.

The trainer config owns what the model sees and how it learns; the DeepSpeed JSON owns how it is distributed
(ZeRO stage, precision, communication, offload, gradient clipping). See deepspeed_configs/README.md.
Presets live in trainer/config/presets.py; `--set section.field=value` overrides any field from the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import BadInputError
from data_pipeline.loaders.spec import check_choice, check_loader_settings

# Model variants of the paper (and one ablation, and CLIP's own loss for comparison).
# variant -> (visual embedding, contrastive loss)
VARIANTS: dict[str, tuple[str, str]] = {
    "baseline": ("vilt", "none"),  # paper model (1): ViLT as published
    "clip-no-infonce": ("clip", "none"),  # ablation: CLIP visual embedding, VQA loss only
    "clip-infonce-cos": ("clip", "cosine"),  # paper model (2): eq. (1), cosine similarity
    "clip-infonce-dot": ("clip", "dot"),  # paper model (3): eq. (2), raw inner product
    "clip-symmetric-ce": ("clip", "clip"),  # CLIP's own symmetric image<->text cross-entropy
}


class ConfigError(BadInputError, ValueError):
    """A configuration value that cannot work; the message names the field."""


@dataclass
class ModelConfig:
    variant: str = "clip-infonce-dot"
    """Which model: baseline | clip-no-infonce | clip-infonce-cos | clip-infonce-dot | clip-symmetric-ce."""
    vilt_pretrained: str | None = None
    """ViLT weights: a transformers checkpoint directory or hub name (e.g. dandelin/vilt-b32-mlm); None = random init."""
    hidden_size: int = 768
    """ViLT hidden size (random init only; a pretrained checkpoint brings its own)."""
    num_layers: int = 12
    """ViLT encoder depth (random init only)."""
    num_heads: int = 12
    """ViLT attention heads (random init only)."""
    intermediate_size: int = 3072
    """ViLT MLP width (random init only)."""
    patch_size: int = 32
    """Patch size of the baseline's own patch projection (random init only)."""
    dropout: float = 0.0
    """Dropout in the ViLT encoder and embeddings (random init only)."""
    init_std: float = 0.02
    """Std of ViLT's random initialisation (transformers' initializer_range; random init only). BERT's 0.02 suits
    pretraining at scale; tiny models trained from scratch learn to use the image sooner from a wider start."""
    clip_arch: str = "ViT-B-32"
    """open_clip architecture name (open_clip.list_models(), plus this project's tiny-* configs)."""
    clip_pretrained: str | None = None
    """CLIP weights: an open_clip pretrained tag (e.g. openai) or a local checkpoint file; None = random init."""
    image_size: int = 384
    """Square input resolution in pixels."""
    max_text_len: int = 40
    """ViLT question length in WordPiece tokens (ViLT: 40)."""
    clip_context_length: int = 77
    """CLIP text tower context length in BPE tokens."""
    text_len: int = 0
    """WordPiece tokens ViLT's text runs at (<= max_text_len; its position table is read up to it). 0 = the
    longest question of the training and validation data, rounded up to a multiple of 8, found at start-up."""
    clip_text_len: int = 0
    """BPE tokens CLIP's text tower runs at (<= clip_context_length), as text_len. A question longer than either is
    cut there, and counted in one warning at start-up."""
    wordpiece_vocab_size: int = 1000
    """Target vocabulary size when a WordPiece vocabulary is built from the training questions."""
    clip_text_vocab: str = "full"
    """CLIP text tower's token table: full (all 49,408 BPE rows) or compact (only the BPE tokens of the training
    questions plus one unknown-token row; ids are mapped inside the embedding, so tokenisation and CLIP's EOT
    pooling are unchanged, and pretrained rows are copied). The full table is most of a tiny model's parameters and
    its optimizer and gradient work on a CPU."""
    attention: str = "sdpa"
    """Fusion encoder attention: sdpa (scaled_dot_product_attention) or eager (transformers' reference)."""
    compile: bool = False
    """torch.compile the fused model with static shapes (dynamic=False); falls back to eager if compiling fails.
    The first step compiles, which takes minutes cold (trainer/modeling/compiling.py; docs/performance.md, "What makes
    training fast")."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"model.variant: unknown variant '{self.variant}' (one of: {', '.join(VARIANTS)})"
            )
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")
        check_choice("model.attention", self.attention, ("sdpa", "eager"), ConfigError)
        if not 0 <= self.text_len <= self.max_text_len:
            raise ConfigError(
                f"model.text_len must be in 0..model.max_text_len ({self.max_text_len}), got {self.text_len}"
            )
        if not 0 <= self.clip_text_len <= self.clip_context_length:
            raise ConfigError(
                f"model.clip_text_len must be in 0..model.clip_context_length ({self.clip_context_length}), "
                f"got {self.clip_text_len}"
            )
        check_choice("model.clip_text_vocab", self.clip_text_vocab, ("full", "compact"), ConfigError)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}"
            )

    @property
    def visual(self) -> str:
        return VARIANTS[self.variant][0]

    @property
    def contrastive(self) -> str:
        return VARIANTS[self.variant][1]

    @property
    def compact_clip_vocab(self) -> bool:
        """Whether CLIP's token table is compacted: asked for, and the variant keeps a text tower to compact (the
        variants without InfoNCE drop it). The tokenizer then records the BPE ids of the training questions."""
        return self.clip_text_vocab == "compact" and self.visual == "clip" and self.contrastive != "none"


@dataclass
class LossConfig:
    infonce_weight: float = 0.1
    """lambda in total = VQA + lambda * InfoNCE (ignored by variants without a contrastive loss)."""
    temperature: float = 0.5
    """tau in eq. (1)/(2): divides every similarity, numerator and denominator."""
    duplicate_questions: str = "none"
    """InfoNCE with identical questions in a batch: none (the paper: they are negatives) | mask (neither negatives
    nor positives) | positive (positives); trainer/modeling/losses.py."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
        check_choice(
            "loss.duplicate_questions", self.duplicate_questions, ("none", "mask", "positive"), ConfigError
        )
        if self.infonce_weight < 0:
            raise ConfigError(f"loss.infonce_weight must be >= 0, got {self.infonce_weight}")


@dataclass
class DataConfig:
    train_data: str | None = None
    """Training shard folder written by data_pipeline.convert (holds *.tar, *.idx, answers.json, manifest.json)."""
    val_data: str | None = None
    """Validation shard folder (same vocabulary as the training one)."""
    loader: str = "auto"
    """auto (DALI where it builds, else PyTorch) | dali | torch."""
    num_workers: int = 2
    """Loader worker processes / DALI CPU threads."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling (DALI initial_fill)."""
    on_short_shard: str = "error"
    """A shard that ends before the samples its index counts (a damaged tar header; PyTorch loader): error | warn
    (log the loss and read on)."""
    host_workers: int = 0
    """DALI loader: processes that parse and tokenise its batches, out of the training process's interpreter lock
    (data_pipeline/loaders/host_pool.py); 0 = a thread of the training process."""

    dali_hw_decoder_load: float = 0.65
    """dali-gpu: share of JPEGs sent to the hardware JPEG decoder (A100/H100/H200) rather than nvJPEG's CUDA path;
    0.65 is NVIDIA's ResNet-50 example value (python -m data_pipeline.tools.bench --hw-decoder-load sweeps it)."""
    dali_prefetch_depth: int = 2
    """DALI's prefetch queue depth: batches its pipeline decodes ahead of the training loop (1..8)."""

    def __post_init__(self) -> None:
        # The loader's own checks (data_pipeline/loaders/spec.py), under this config's field names.
        names = {
            "hw_decoder_load": "dali_hw_decoder_load", "prefetch_depth": "dali_prefetch_depth",
            "host_workers": "host_workers", "kind": "loader", "on_short_shard": "on_short_shard",
        }  # fmt: skip
        check_loader_settings(
            {spec_field: getattr(self, field) for spec_field, field in names.items()},
            {spec_field: f"data.{field}" for spec_field, field in names.items()},
            ConfigError,
        )


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW peak learning rate (ViLT VQA fine-tuning: 1e-4)."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and norms."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    head_lr_mult: float = 10.0
    """The VQA head learns at lr * head_lr_mult (ViLT: 10)."""
    clip_lr: float | None = None
    """Learning rate of the CLIP encoder (None = lr)."""
    freeze_clip: bool = False
    """Freeze the CLIP encoder entirely."""
    warmup_ratio: float = 0.1
    """Fraction of max_steps spent in linear warm-up, then linear decay to zero."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainConfig:
    global_batch_size: int = 256
    """Samples per optimizer step over all ranks = micro_batch_size * grad_accum * world size."""
    micro_batch_size: int = 32
    """Samples per rank per forward pass."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    seed: int = 0
    log_every: int = 10
    """Steps between logged metrics (the only steps that synchronise with the host)."""
    eval_every: int = 0
    """Steps between evaluations (0 = only at the end)."""
    ckpt_every: int = 0
    """Steps between checkpoints (0 = only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    verify_checkpoints: bool = True
    """Before a resume, check every file of the checkpoint against the content hash in its COMPLETE marker (reads
    it once more; docs/training.md gives the cost); a checkpoint that fails is passed over, never deleted. false
    resumes damaged bytes as if intact."""
    on_nonfinite: str = "stop"
    """NaN/inf loss: stop (with the step and question ids) or skip the step."""
    eval_batch_size: int = 0
    """Samples per rank per evaluation batch (0 = micro_batch_size)."""
    progress_bar: bool = True
    """A tqdm progress bar on rank 0 (samples/s, ETA)."""
    eval_at_start: bool = False
    """Evaluate before the first training step (after --resume: the loaded weights), as a reference point."""
    vqa_rule: str = "vqa-2021"
    """Version of the official VQA accuracy reported as val/vqa_score: vqa-2021 (vqaEval.py at GT-Vision-Lab/VQA
    a013f00, 2021-03-11) or vqa-2016 (458a8b2, the older rule that many published numbers used)."""

    def __post_init__(self) -> None:
        check_choice("train.vqa_rule", self.vqa_rule, ("vqa-2021", "vqa-2016"), ConfigError)
        check_choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"), ConfigError)
        for name in ("global_batch_size", "micro_batch_size", "max_steps", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "eval_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; fails plainly when the batch sizes do not add up."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size {self.micro_batch_size} x world size {world_size} = {per_step}: "
                f"micro-batch x gradient accumulation x world size must equal the global batch; "
                f"change train.micro_batch_size or train.global_batch_size, or the number of ranks"
            )
        return self.global_batch_size // per_step

    @property
    def eval_micro_batch(self) -> int:
        return self.eval_batch_size or self.micro_batch_size


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _coerce(raw: str, typ: Any, where: str) -> Any:
    """Parse a command-line string into the annotated type of a config field."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(raw, inner[0], where)
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: '{raw}' is not a boolean (true/false)")
    if origin is tuple:
        parts = raw.strip("()[] ").split(",")
        if len(parts) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got '{raw}'")
        return tuple(_coerce(p.strip(), a, where) for p, a in zip(parts, args, strict=True))
    try:
        return typ(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{raw}' is not a valid {getattr(typ, '__name__', typ)}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Return a new config with `section.field=value` overrides applied (the input is not mutated)."""
    sections = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set '{item}': expected section.field=value (e.g. train.max_steps=100)")
        if section not in sections:
            raise ConfigError(f"--set '{item}': unknown section '{section}' (one of: {', '.join(sections)})")
        section_cls = type(getattr(cfg, section))
        hints = typing.get_type_hints(section_cls)
        if name not in hints:
            raise ConfigError(
                f"--set '{item}': unknown field '{section}.{name}' (fields: {', '.join(sorted(hints))})"
            )
        sections[section][name] = _coerce(raw.strip(), hints[name], f"{section}.{name}")
    built = {}
    for f in dataclasses.fields(cfg):
        section_cls = type(getattr(cfg, f.name))
        built[f.name] = section_cls(**sections[f.name])
    return RunConfig(**built)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its saved JSON form (tuples come back as lists)."""
    built = {}
    for f in dataclasses.fields(RunConfig):
        section_cls = typing.get_type_hints(RunConfig)[f.name]
        values = dict(data.get(f.name, {}))
        hints = typing.get_type_hints(section_cls)
        for k, v in list(values.items()):
            if k not in hints:
                raise ConfigError(f"config: unknown field '{f.name}.{k}'")
            if isinstance(v, list):
                values[k] = tuple(v)
        built[f.name] = section_cls(**values)
    return RunConfig(**built)


# -- help text ---------------------------------------------------------------------------------------------------
def field_docs() -> dict[str, str]:
    """`section.field` -> the docstring under it in this file (for --help)."""
    tree = ast.parse(Path(__file__).read_text())
    sections = {
        f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in dataclasses.fields(RunConfig)
    }
    docs: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in sections):
            continue
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                nxt = body[i + 1] if i + 1 < len(body) else None
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[f"{sections[node.name]}.{stmt.target.id}"] = " ".join(str(nxt.value.value).split())
    return docs


def fields_help() -> str:
    """Every field `--set` accepts, with its type, default and docstring (trainer/main.py's --help epilog)."""
    docs = field_docs()
    lines = ["configuration fields for --set (defaults of the dataclasses; presets change some):"]
    default = RunConfig()
    for section in dataclasses.fields(RunConfig):
        obj = getattr(default, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            key = f"{section.name}.{f.name}"
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"  {key} ({typ}, default {getattr(obj, f.name)!r})")
            if key in docs:
                lines.append(f"      {docs[key]}")
    return "\n".join(lines)
