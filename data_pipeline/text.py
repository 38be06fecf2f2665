"""Question tokenisation for both text paths of the model: ViLT's BERT WordPiece and CLIP's BPE.

ViLT's tokenizer is BERT WordPiece. With a pretrained ViLT checkpoint its own tokenizer files are used; without one a
WordPiece vocabulary is built from the training questions (whole words by count, every character as a fallback; the
same in every process) and saved in the run folder, so a run is reproducible offline. CLIP's tokenizer is open_clip's own (its BPE vocabulary ships with the package).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import normalizers, pre_tokenizers

from common import atomic
from common.clip_configs import register_project_configs
from common.errors import BadInputError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_META = "question_tokenizer.json"
CLIP_VOCAB_FILE = "clip_vocab.json"


class TokenizerError(BadInputError, ValueError):
    """A tokenizer that cannot be built or loaded; the message names the path."""


def _train_wordpiece(questions: Iterable[str], vocab_size: int) -> dict[str, int]:
    """A BERT WordPiece vocabulary for `questions`, the same in every process: the special tokens (BERT's order, so
    [PAD] is id 0 as ViLT's embedding padding_idx expects), every character the questions use as a word start and as a
    continuation (`##c`), so that any word of them can be spelt, then whole words by decreasing count (ties
    alphabetically) up to `vocab_size` entries. Words are what BERT's normaliser (lower case) and pre-tokenizer make
    of the questions, as the tokenizer will split them.

    Not the `tokenizers` library's WordPieceTrainer: it numbers the subwords it creates in hash-map order, which
    differs from process to process, and breaks ties between merges by those numbers, so the same questions gave
    another vocabulary (other ids, even other tokens) in every run (tokenizers 0.23.3; upstream report
    huggingface/tokenizers#1794)."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for question in questions:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(question)))
    chars = sorted({c for word in counts for c in word})
    tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    known = set(tokens)
    for word, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in known:
            tokens.append(word)
            known.add(word)
    return {token: i for i, token in enumerate(tokens)}


class QuestionTokenizer:
    """Turns question strings into ViLT WordPiece ids (+ mask) and CLIP BPE ids, padded to fixed lengths."""

    def __init__(
        self, vilt_tokenizer, *, clip_arch: str, max_text_len: int, clip_context_length: int
    ) -> None:
        register_project_configs()
        self.vilt = vilt_tokenizer
        self.clip_arch = clip_arch
        self.max_text_len = max_text_len
        self.clip_context_length = clip_context_length
        import open_clip  # lazy, as transformers below: ~2 s that building a vocabulary alone need not pay

        self.clip = open_clip.get_tokenizer(clip_arch, context_length=clip_context_length)
        # The BPE ids of the training questions, for model.clip_text_vocab=compact (None until fitted).
        self.clip_vocab: list[int] | None = None

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        questions: Iterable[str],
        out_dir: str | Path,
        *,
        clip_arch: str,
        max_text_len: int,
        clip_context_length: int,
        vocab_size: int = 1000,
        fit_clip_vocab: bool = False,
    ) -> QuestionTokenizer:
        """Train a BERT WordPiece vocabulary on `questions`, save it (and the settings) in `out_dir`, load it.
        With fit_clip_vocab, also record the CLIP BPE ids the questions use (model.clip_text_vocab=compact)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        questions = list(questions)
        vocab = _train_wordpiece(questions, vocab_size)
        # BertTokenizerFast adds [CLS] ... [SEP] itself (the raw `tokenizers` trainer does not): ViLT's pooler
        # reads the [CLS] position.
        from transformers import BertTokenizerFast  # lazy: see open_clip above

        vilt = BertTokenizerFast(vocab=vocab, do_lower_case=True)
        vilt.save_pretrained(str(out))
        self = cls(
            vilt, clip_arch=clip_arch, max_text_len=max_text_len, clip_context_length=clip_context_length
        )
        if fit_clip_vocab:
            self.fit_clip_vocab(questions)
            self._save_clip_vocab(out)
        self._save_meta(out, source="built")
        log.info("built a WordPiece vocabulary of %d tokens in %s", len(vilt), out)
        return self

    @classmethod
    def from_pretrained_vilt(
        cls, path: str, *, clip_arch: str, max_text_len: int, clip_context_length: int
    ) -> QuestionTokenizer:
        """ViLT's own tokenizer from a transformers checkpoint directory (or a hub name already in the cache)."""
        try:
            from transformers import BertTokenizerFast  # lazy: see open_clip above

            vilt = BertTokenizerFast.from_pretrained(path, local_files_only=True)
        except OSError as exc:
            raise TokenizerError(
                f"no ViLT tokenizer at '{path}': pass a directory saved with save_pretrained "
                f"(tokenizer.json or vocab.txt) or download the checkpoint first ({exc.__class__.__name__})"
            ) from None
        if len(vilt) <= len(SPECIAL_TOKENS):
            # transformers 5 returns a tokenizer of special tokens only, without an error, for a name whose files are
            # not on disk: saved into a run folder it would turn every question into [UNK].
            raise TokenizerError(
                f"no ViLT tokenizer at '{path}': it has no vocabulary beyond the special tokens (not downloaded? "
                f"run ./launch.sh fetch-weights)"
            )
        return cls(
            vilt, clip_arch=clip_arch, max_text_len=max_text_len, clip_context_length=clip_context_length
        )

    @classmethod
    def load(cls, directory: str | Path) -> QuestionTokenizer:
        """Reload a tokenizer saved in a run folder by `build` or `save`."""
        d = Path(directory)
        meta_file = d / _META
        if not meta_file.is_file():
            raise TokenizerError(f"no question tokenizer in '{d}' ({_META} is missing)")
        meta = json.loads(meta_file.read_text())
        from transformers import BertTokenizerFast  # lazy: see open_clip above

        vilt = BertTokenizerFast.from_pretrained(str(d), local_files_only=True)
        self = cls(
            vilt,
            clip_arch=meta["clip_arch"],
            max_text_len=meta["max_text_len"],
            clip_context_length=meta["clip_context_length"],
        )
        clip_vocab_file = d / CLIP_VOCAB_FILE
        if clip_vocab_file.is_file():
            ids = json.loads(clip_vocab_file.read_text())
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise TokenizerError(f"{clip_vocab_file}: expected a JSON list of BPE token ids")
            self.clip_vocab = ids
        return self

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.vilt.save_pretrained(str(d))
        self._save_clip_vocab(d)
        self._save_meta(d, source="saved")

    def fit_clip_vocab(self, questions: Iterable[str], chunk: int = 4096) -> list[int]:
        """Record the CLIP BPE ids that `questions` use, padding, start and end of text included."""
        unique = sorted(set(questions))  # questions repeat a lot (easy-VQA: a few hundred distinct of 38k)
        seen: set[int] = set()
        for start in range(0, len(unique), chunk):
            seen.update(self.clip(unique[start : start + chunk]).unique().tolist())
        self.clip_vocab = sorted(seen)
        log.info("the questions use %d CLIP BPE tokens", len(self.clip_vocab))
        return self.clip_vocab

    def _save_clip_vocab(self, d: Path) -> None:
        # Written before the meta file, which marks a complete tokenizer folder.
        if self.clip_vocab is None:
            return
        atomic.write_text(d / CLIP_VOCAB_FILE, json.dumps(self.clip_vocab) + "\n")

    def _save_meta(self, d: Path, source: str) -> None:
        meta = {
            "clip_arch": self.clip_arch,
            "max_text_len": self.max_text_len,
            "clip_context_length": self.clip_context_length,
            "vilt_vocab_size": self.vilt_vocab_size,
            "source": source,
        }
        atomic.write_text(d / _META, json.dumps(meta, indent=2) + "\n")

    # -- use ----------------------------------------------------------------------------------------------------
    @property
    def vilt_vocab_size(self) -> int:
        return len(self.vilt)

    def __call__(self, questions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.vilt(
            questions,
            padding="max_length",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {
            "vilt_ids": enc["input_ids"].long(),
            "vilt_mask": enc["attention_mask"].long(),
            "clip_ids": self.clip(questions).long(),
        }
