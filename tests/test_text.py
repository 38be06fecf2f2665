"""Question tokenisation: a WordPiece vocabulary built offline from the questions, and CLIP's BPE."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizerFast

from data_pipeline.text import QuestionTokenizer, TokenizerError

QUESTIONS = [
    "What color is the shape?",
    "Is there a red circle?",
    "What shape is in the image?",
    "Is it blue?",
] * 5


def _build(tmp_path, **kw):
    return QuestionTokenizer.build(
        QUESTIONS, tmp_path / "tok", clip_arch="ViT-tiny-8", max_text_len=12, clip_context_length=16, **kw
    )


def test_wordpiece_built_offline_wraps_questions_in_cls_sep(tmp_path):
    tok = _build(tmp_path, vocab_size=120)
    enc = tok(["What color is the shape?", "is it blue"])
    assert set(enc) == {"vilt_ids", "vilt_mask", "clip_ids"}
    assert enc["vilt_ids"].shape == (2, 12) and enc["vilt_ids"].dtype == torch.int64
    assert enc["clip_ids"].shape == (2, 16)
    ids = enc["vilt_ids"][0][enc["vilt_mask"][0].bool()].tolist()
    assert ids[0] == tok.vilt.cls_token_id == 2 and ids[-1] == tok.vilt.sep_token_id == 3
    assert tok.vilt.pad_token_id == 0 and (enc["vilt_ids"][enc["vilt_mask"] == 0] == 0).all()
    assert tok.vilt.unk_token_id not in ids, "every word of the training questions is in the vocabulary"
    assert tok.vilt.decode(ids, skip_special_tokens=True) == "what color is the shape?"
    assert enc["clip_ids"][0, 0] == 49406  # CLIP's start-of-text


def test_saved_tokenizer_reloads_identically(tmp_path):
    tok = _build(tmp_path)
    again = QuestionTokenizer.load(tmp_path / "tok")
    for key, value in tok(QUESTIONS[:4]).items():
        torch.testing.assert_close(again(QUESTIONS[:4])[key], value)
    assert again.vilt_vocab_size == tok.vilt_vocab_size


def test_pretrained_vilt_tokenizer_from_a_saved_directory(tmp_path):
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "it", "?"])
    }
    BertTokenizerFast(vocab=vocab).save_pretrained(tmp_path / "vilt")
    tok = QuestionTokenizer.from_pretrained_vilt(
        str(tmp_path / "vilt"), clip_arch="ViT-tiny-8", max_text_len=6, clip_context_length=16
    )
    assert tok(["what is it?"])["vilt_ids"][0].tolist() == [2, 5, 6, 7, 8, 3]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no question tokenizer in"):
        QuestionTokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="no ViLT tokenizer at"):
        QuestionTokenizer.from_pretrained_vilt(
            str(tmp_path / "missing"), clip_arch="ViT-tiny-8", max_text_len=6, clip_context_length=16
        )
    # A hub name whose files are not on disk: transformers gives a tokenizer of special tokens only, no error.
    with pytest.raises(TokenizerError, match="no vocabulary beyond the special tokens.*fetch-weights"):
        QuestionTokenizer.from_pretrained_vilt(
            "test-org/not-downloaded", clip_arch="ViT-tiny-8", max_text_len=6, clip_context_length=16
        )


def test_clip_vocabulary_is_fitted_on_the_questions_and_saved(tmp_path):
    """fit_clip_vocab records every BPE id the questions use (start, end and padding included); it reloads."""
    tok = _build(tmp_path, fit_clip_vocab=True)
    used = set(tok(sorted(set(QUESTIONS)))["clip_ids"].flatten().tolist())
    assert tok.clip_vocab == sorted(used) and {0, 49406, 49407} <= used
    assert QuestionTokenizer.load(tmp_path / "tok").clip_vocab == tok.clip_vocab
    assert _build(tmp_path / "plain").clip_vocab is None
    assert QuestionTokenizer.load(tmp_path / "plain" / "tok").clip_vocab is None
    (tmp_path / "tok" / "clip_vocab.json").write_text('{"a": 1}')
    with pytest.raises(TokenizerError, match="clip_vocab.json: expected a JSON list"):
        QuestionTokenizer.load(tmp_path / "tok")


def test_wordpiece_vocabulary_is_the_same_in_every_process(tmp_path) -> None:
    """Built in three separate processes from the same questions: the same tokens with the same ids (a run started
    afresh with the same seed must train the same model)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    questions = [
        f"is the {w} shape {c} or {d}?" for w in ("big", "small", "tiny") for c, d in (("red", "blue"),)
    ]
    questions += ["how many dogs are there?", "what is the man holding?", "is this a zebra?"] * 3
    (tmp_path / "q.json").write_text(json.dumps(questions))
    script = (
        "import json, sys\n"
        "from data_pipeline.text import _train_wordpiece\n"
        "print(json.dumps(list(_train_wordpiece(json.load(open(sys.argv[1])), 60).items())))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    outs = [
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "q.json")],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(3)
    ]
    assert outs[0] == outs[1] == outs[2]
    vocab = dict(json.loads(outs[0]))
    assert list(vocab)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) == 60
    # Characters and their continuations first, then whole words by decreasing count, ties alphabetically, until
    # the size is reached ("zebra", seen as often as "what", is cut).
    assert list(vocab)[5:8] == ["?", "a", "b"] and "##z" in vocab
    words = [t for t in vocab if len(t) > 1 and not t.startswith(("##", "["))]
    assert words == [
        *("is", "the"),
        *(
            "are",
            "blue",
            "dogs",
            "holding",
            "how",
            "man",
            "many",
            "or",
            "red",
            "shape",
            "there",
            "this",
            "what",
        ),
    ]
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert "[UNK]" not in tok.tokenize("is the zebra holding a dog?")  # unseen words are spelt, not lost
