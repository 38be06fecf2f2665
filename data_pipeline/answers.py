"""VQA answers: the official normalisation, the answer vocabulary, soft scores and the official VQA accuracy.

The normalisation is the official VQA evaluation script's (`vqaEval.py` of the VQA API, used for VQA v1/v2):
`processPunctuation` then `processDigitArticle` (punctuation, number words to digits, articles dropped,
contractions restored). A predicted answer scores the average, over the 10 leave-one-out subsets of 9 annotators, of
min(1, matching annotators / 3): 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >=4 matches.

Two definitions use this, on purpose different:
- training targets and the answer vocabulary (`answer_scores`, `build_vocabulary`): every annotator answer fully
  normalised, as ViLT builds them;
- the reported accuracy (`vqa_score`, which trainer/run/evaluation.py computes for every prediction from the raw
  annotator answers in the shards): exactly the official script, quirks included, so that the number matches
  published ones. Two versions of the script are in use (`VQA_RULES`):
  - "vqa-2021" (the default): vqaEval.py at GT-Vision-Lab/VQA commit a013f00 (2021-03-11, "Fixed processing
    answers bug"): prediction and annotators' answers cleaned of newlines, tabs and surrounding white space; when the
    annotators do not all give the same (cleaned) string, both are fully normalised (punctuation, then number words,
    articles, contractions); when they all agree, both are compared as cleaned;
  - "vqa-2016": vqaEval.py at commit 458a8b2 (2016), which scored many published results: the prediction is always
    fully normalised, the annotators' answers are taken raw, or by punctuation only when they are not all the same
    string.
  Both run the period-stripping regex with `count=re.UNICODE` (32), as the script does.
See docs/data_pipeline.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

# Tables copied from the official evaluation script; keys that can never match after lower-casing ("Im", "Ive",
# "Id've") and the odd "somebody'd" -> "somebodyd" are the official behaviour and stay.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The official pattern is "(?!<=\d)(\.)(?!\d)": a typo for a look-behind, so it strips every period not followed by
# a digit. Kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")

ANSWER_TYPES = ("yes/no", "number", "other")
"""VQA v2's answer types, in the order the evaluator reports them."""


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # count=re.UNICODE (32) reproduces the official call `periodStrip.sub("", outText, re.UNICODE)`.
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as the official evaluation does (whitespace, punctuation, digits, articles)."""
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def soft_score(matches: int, annotators: int = 10) -> float:
    """Official accuracy of an answer given by `matches` of `annotators` people.

    The mean over the leave-one-out subsets of min(1, matches among the other annotators / 3): an annotator who
    gave the answer leaves matches-1 others, one who did not leaves all `matches`. For 10 annotators this is
    0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >=4 matches.
    """
    if annotators <= 0 or not 0 <= matches <= annotators:
        raise ValueError(f"need 0 <= matches <= annotators and annotators > 0, got {matches} of {annotators}")
    total = matches * min(1.0, (matches - 1) / 3) + (annotators - matches) * min(1.0, matches / 3)
    return round(total / annotators, 6)


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every distinct normalised answer among the annotators' `answers` (training targets)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: soft_score(n, len(answers)) for a, n in counts.items()}


def labels_and_scores(
    answers: Sequence[str], answer_to_index: dict[str, int]
) -> tuple[list[int], list[float]]:
    """Vocabulary indices and soft scores of the annotators' answers that are in the vocabulary, by index."""
    pairs = sorted(
        (answer_to_index[a], s) for a, s in answer_scores(answers).items() if a in answer_to_index and s > 0
    )
    return [i for i, _ in pairs], [s for _, s in pairs]


VQA_2021 = "vqa-2021"
VQA_2016 = "vqa-2016"
VQA_RULES = (VQA_2021, VQA_2016)
"""The official accuracy's versions (`vqa_score`'s `rule`): the current script (a013f00, 2021) and the 2016 one."""
DEFAULT_VQA_RULE = VQA_2021


def check_rule(rule: str, where: str = "rule") -> str:
    """`rule` if it names a version of the official accuracy, else a ValueError naming `where`."""
    if rule not in VQA_RULES:
        raise ValueError(f"{where}: '{rule}' is not one of {', '.join(VQA_RULES)}")
    return rule


def vqa_score(prediction: str, answers: Sequence[str], rule: str = DEFAULT_VQA_RULE) -> float:
    """Official VQA accuracy of one predicted answer against the annotators' raw answers, as `vqaEval.py` of the VQA
    API (PythonEvaluationTools/vqaEvaluation/vqaEval.py) computes it in the version `rule` (`VQA_RULES`):

    - "vqa-2021": answers and prediction cleaned of newlines, tabs and surrounding white space; if the cleaned
      answers are not all the same string, answers and prediction are both fully normalised (`processPunctuation`
      then `processDigitArticle`), else compared as cleaned ("Dog." matches ten "Dog.", "dog" does not);
    - "vqa-2016": the prediction cleaned and fully normalised; the answers taken as they are when all are the same
      string, else `processPunctuation` only (no lower-casing, number words or articles: "Two" never matches);
    - the score: the mean over the leave-one-out subsets of min(1, matching answers among the others / 3).
    """
    refs = reference_answers(answers, rule)
    return score_against(compared_prediction(prediction, normalises_prediction(answers, rule)), refs)


def normalize_prediction(prediction: str) -> str:
    """A predicted answer fully normalised, as both versions compare it where they normalise it."""
    return _process_digit_article(_process_punctuation(_clean_whitespace(prediction)))


def compared_prediction(prediction: str, normalise: bool) -> str:
    """A predicted answer as the official script compares it: cleaned, and fully normalised if `normalise`
    (`normalises_prediction` says when)."""
    return normalize_prediction(prediction) if normalise else _clean_whitespace(prediction)


def _annotators_agree(answers: Sequence[str], rule: str) -> bool:
    # 2021 compares the answers after cleaning ("dog" and "dog " agree), 2016 the raw strings.
    texts = [_clean_whitespace(a) for a in answers] if rule == VQA_2021 else list(answers)
    return len(set(texts)) <= 1


def normalises_prediction(answers: Sequence[str], rule: str = DEFAULT_VQA_RULE) -> bool:
    """Whether version `rule` normalises the prediction for a question with these annotators' answers: 2016 always,
    2021 only where the annotators disagree."""
    check_rule(rule)
    return rule == VQA_2016 or not _annotators_agree(answers, rule)


def reference_answers(answers: Sequence[str], rule: str = DEFAULT_VQA_RULE) -> tuple[str, ...]:
    """The annotators' raw answers as version `rule` of the official script compares them (computed once per
    question)."""
    check_rule(rule)
    if not answers:
        raise ValueError("the official VQA accuracy needs at least one annotator answer")
    agree = _annotators_agree(answers, rule)
    if rule == VQA_2016:
        return tuple(answers) if agree else tuple(_process_punctuation(a) for a in answers)
    cleaned = tuple(_clean_whitespace(a) for a in answers)
    return cleaned if agree else tuple(_process_digit_article(_process_punctuation(a)) for a in cleaned)


def score_against(prediction: str, references: Sequence[str]) -> float:
    """Official accuracy of an already compared prediction (`compared_prediction`) against already processed
    annotator answers (`reference_answers`)."""
    return soft_score(sum(1 for a in references if a == prediction), len(references))


def build_vocabulary(major_answers: Iterable[str], min_count: int) -> list[str]:
    """ViLT's answer vocabulary: normalised majority answers seen at least `min_count` times.

    Ordered by decreasing count, then alphabetically, so that the same annotations always give the same indices.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = Counter(normalize_answer(a) for a in major_answers)
    kept = [(a, n) for a, n in counts.items() if n >= min_count and a != ""]
    return [a for a, _ in sorted(kept, key=lambda an: (-an[1], an[0]))]
