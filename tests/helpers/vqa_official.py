"""Both versions of the official VQA accuracy (`vqaEval.py` of GT-Vision-Lab/VQA), written out from the script's
text as straightforward transcriptions of its loop, independent of data_pipeline/answers.py: `official_2021`
(commit a013f00, 2021-03-11) and `official_2016` (commit 458a8b2). tests/test_vqa_rules.py describes both."""

from __future__ import annotations

import re

# -- the script's helpers, written out ---------------------------------------------------------------------------
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = ["a", "an", "the"]
# The entries of the script's contraction table that the cases below use.
_CONTRACTIONS = {"dont": "don't", "isnt": "isn't", "whats": "what's", "cant": "can't", "youre": "you're"}


def _punctuation(in_text: str) -> str:
    out_text = in_text
    for p in _PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, re.UNICODE)  # re.UNICODE lands in `count`, as in the script


def _digit_article(in_text: str) -> str:
    out_text = []
    for word in in_text.lower().split():
        word = _NUMBERS.setdefault(word, word) if word in _NUMBERS else word
        if word not in _ARTICLES:
            out_text.append(word)
    for i, word in enumerate(out_text):
        if word in _CONTRACTIONS:
            out_text[i] = _CONTRACTIONS[word]
    return " ".join(out_text)


def clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _accuracy(gts: list[dict], res_ans: str) -> float:
    acc = []
    for datum in gts:
        other = [item for item in gts if item != datum]
        matching = [item for item in other if item["answer"] == res_ans]
        acc.append(min(1.0, float(len(matching)) / 3))
    return float(sum(acc)) / len(acc)


def official_2021(prediction: str, raw: list[str]) -> float:
    """vqaEval.py at a013f00, one question."""
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(raw)]
    for ans in gts:
        ans["answer"] = clean(ans["answer"])
    res_ans = clean(prediction)
    if len({ans["answer"] for ans in gts}) > 1:
        for ans in gts:
            ans["answer"] = _digit_article(_punctuation(ans["answer"]))
        res_ans = _digit_article(_punctuation(res_ans))
    return _accuracy(gts, res_ans)


def official_2016(prediction: str, raw: list[str]) -> float:
    """vqaEval.py at 458a8b2, one question."""
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(raw)]
    res_ans = _digit_article(_punctuation(clean(prediction)))
    if len({ans["answer"] for ans in gts}) > 1:
        for ans in gts:
            ans["answer"] = _punctuation(ans["answer"])
    return _accuracy(gts, res_ans)


OFFICIAL = {"vqa-2021": official_2021, "vqa-2016": official_2016}
