"""Evaluation tasks as pure functions: prompt generators and scores (no model, no I/O).

- Pass-key retrieval: a 5-digit key hidden at a chosen depth of seeded filler sentences.
- Needle in a haystack: "The special code word for <city> is <word>." inside longer text.
- Free-text QA scores: exact match and token F1 after SQuAD-style normalisation.

A prompt is returned in two parts, ``context`` and ``question``: the evaluator prefills
the context, then feeds the question as a second step *through the cache*, so the question
is answered from whatever state the cache kept of the context. Lengths are in tokens of
the tokenizer given (``context`` with the tokenizer's special tokens, ``question`` without).
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

# Filler is composed from these parts with a seeded RNG: many distinct, bland sentences
# that carry no digits and no "code word" phrasing a model could confuse with the target.
_SUBJECTS = (
    "The old ferry",
    "A quiet librarian",
    "The morning train",
    "A flock of gulls",
    "The village baker",
    "A patient gardener",
    "The river barge",
    "A tired cartographer",
    "The hillside orchard",
    "A travelling musician",
    "The harbour crane",
    "A curious student",
    "The wooden bridge",
    "A retired sailor",
    "The market square",
    "A young carpenter",
)
_VERBS = (
    "waited",
    "rested",
    "lingered",
    "wandered",
    "paused",
    "hummed quietly",
    "looked around",
    "kept still",
    "moved slowly",
    "drifted along",
)
_PLACES = (
    "near the eastern gate",
    "beside the grey stones",
    "under a pale sky",
    "along the narrow canal",
    "behind the chapel",
    "at the edge of the meadow",
    "by the shuttered windows",
    "among the tall reeds",
    "past the empty stalls",
    "outside the town hall",
)
_TIMES = (
    "before noon",
    "while the bells rang",
    "as the fog lifted",
    "late in the afternoon",
    "during the long evening",
    "after the rain",
    "once the wind dropped",
    "until dusk",
)

CITIES = (
    "Lisbon",
    "Nairobi",
    "Oslo",
    "Montreal",
    "Hanoi",
    "Lima",
    "Krakow",
    "Adelaide",
    "Tunis",
    "Reykjavik",
    "Bogota",
    "Osaka",
)
CODE_WORDS = (
    "lantern",
    "marigold",
    "compass",
    "velvet",
    "thimble",
    "glacier",
    "saffron",
    "harmonica",
    "pebble",
    "falcon",
    "quartz",
    "tangerine",
)

Tokenize = Callable[..., dict]


@dataclass
class TaskPrompt:
    """One generated example. ``context`` is prefilled, ``question`` fed after it."""

    kind: str
    context: str
    question: str
    answer: str
    depth: float  # requested depth fraction of the inserted fact
    actual_depth: float  # where the fact really starts, as a fraction of the tokens
    n_tokens: int  # len(context tokens) + len(question tokens)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("context")
        return d


def filler_sentences(n: int, seed: int) -> list[str]:
    """``n`` seeded filler sentences (deterministic for a given seed)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        for _ in range(n)
    ]


def text_sentences(texts: Sequence[str], min_chars: int = 20, max_chars: int = 400) -> list[str]:
    """Split documents into sentence-like pieces (for a real-text haystack); pieces
    outside ``[min_chars, max_chars]`` and any holding a 5-digit number are left out."""
    out = []
    for text in texts:
        for piece in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
            piece = " ".join(piece.split())
            if min_chars <= len(piece) <= max_chars and not re.search(r"\d{5}", piece):
                out.append(piece)
    return out


def _n_tokens(tokenizer, text: str, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def _assemble(header: str, sentences: Sequence[str], fact: str, at: int) -> tuple[str, str]:
    """Context text and the part of it that precedes the fact."""
    before = header + " ".join(sentences[:at])
    after = " ".join(sentences[at:])
    sep = " " if sentences[:at] else ""
    return before + sep + fact + (" " + after if after else ""), before + sep


def _fit(
    tokenizer,
    length: int,
    depth: float,
    header: str,
    fact: str,
    question: str,
    pool: Callable[[int], list[str]],
) -> tuple[str, float, int]:
    """Choose how many filler sentences make ``context + question`` at most ``length`` tokens
    (as close as possible) and place ``fact`` at ``depth`` of them.

    Returns ``(context, actual_depth, n_tokens)``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    q_tok = _n_tokens(tokenizer, question, False)
    fixed = _n_tokens(tokenizer, header + fact, True) + q_tok
    if fixed > length:
        raise ValueError(
            f"a prompt of {length} tokens cannot hold the task's fixed text ({fixed} tokens); "
            "use a longer context."
        )
    budget = length - fixed
    n_pool = 64
    while True:  # enough sentences to fill the budget, with their token counts
        sents = pool(n_pool)
        counts = tokenizer([" " + x for x in sents], add_special_tokens=False)["input_ids"]
        cum = list(itertools.accumulate(len(c) for c in counts))
        if not cum or cum[-1] >= budget or n_pool >= 1 << 20:
            break
        n_pool *= 2

    def build(n):
        # The fact goes after the sentences that hold about `depth` of the filler tokens.
        at = bisect.bisect_right(cum, depth * cum[n - 1], 0, n) if n else 0
        context, before = _assemble(header, sents[:n], fact, at)
        return context, before, _n_tokens(tokenizer, context, True) + q_tok, n

    cur = build(bisect.bisect_right(cum, budget))
    while cur[2] > length and cur[3] > 0:
        cur = build(cur[3] - 1)
    if cur[2] > length:
        raise ValueError(f"could not fit the prompt into {length} tokens; use a longer context.")
    while cur[3] < len(sents):  # token counts are nearly additive: at most a few steps
        nxt = build(cur[3] + 1)
        if nxt[2] > length:
            break
        cur = nxt
    context, before, total, _ = cur
    actual = _n_tokens(tokenizer, before, True) / max(total, 1)
    return context, actual, total


def passkey_prompt(tokenizer, length: int, depth: float, seed: int = 0) -> TaskPrompt:
    """Pass-key retrieval: a seeded 5-digit key at ``depth`` of ``length`` tokens of filler."""
    rng = random.Random(f"passkey-{seed}")
    key = str(rng.randint(10000, 99999))
    header = (
        "A pass key is hidden somewhere in the following text. Find it and remember it, "
        "because you will be asked for it at the end.\n\n"
    )
    fact = f"The pass key is {key}. Remember it: {key} is the pass key."
    question = "\n\nWhat is the pass key? The pass key is"

    def pool(n):
        return filler_sentences(n, seed=1000 * seed + 17)

    context, actual, total = _fit(tokenizer, length, depth, header, fact, question, pool)
    return TaskPrompt("passkey", context, question, key, depth, actual, total)


def needle_prompt(
    tokenizer,
    length: int,
    depth: float,
    seed: int = 0,
    haystack: Sequence[str] | None = None,
) -> TaskPrompt:
    """Needle in a haystack: one city's code word, asked for at the end.

    ``haystack``: sentences to fill with (e.g. real text from :func:`text_sentences`);
    default: seeded filler sentences. Sentences are taken in order from a seeded offset.
    """
    rng = random.Random(f"needle-{seed}")
    city, word = rng.choice(CITIES), rng.choice(CODE_WORDS)
    header = "Read the following text carefully.\n\n"
    fact = f"The special code word for {city} is {word}."
    question = f"\n\nWhat is the special code word for {city}? The special code word for {city} is"
    if haystack:
        start = rng.randrange(len(haystack))

        def pool(n):
            return [haystack[(start + i) % len(haystack)] for i in range(n)]
    else:

        def pool(n):
            return filler_sentences(n, seed=1000 * seed + 29)

    context, actual, total = _fit(tokenizer, length, depth, header, fact, question, pool)
    return TaskPrompt("needle", context, question, word, depth, actual, total, {"city": city})


# -- scores -------------------------------------------------------------------------------
def passkey_score(prediction: str, answer: str) -> float:
    """1.0 if the first number in ``prediction`` is exactly the pass key."""
    m = re.search(r"\d+", prediction)
    return float(m is not None and m.group(0) == answer)


def needle_score(prediction: str, answer: str) -> float:
    """1.0 if the code word appears as a word of the (normalised) prediction."""
    return float(normalize_answer(answer) in normalize_answer(prediction).split())


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(refs) -> list[str]:
    if isinstance(refs, str):
        return [refs]
    if isinstance(refs, (list, tuple)):
        return [str(r) for r in refs]
    return [str(refs)]


def exact_match(prediction: str, references) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in _as_list(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, references) -> float:
    """Best token-overlap F1 of the normalised prediction against the references."""
    p = normalize_answer(prediction).split()
    return max(_f1(p, normalize_answer(r).split()) for r in _as_list(references))


def first_line(text: str) -> str:
    """The answer part of a free-text generation: up to the first line break."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if text else ""


def answers_of(value) -> list[str]:
    """Reference answers from a dataset cell: a string, a list, or a SQuAD-style
    ``{"text": [...], ...}`` mapping."""
    if isinstance(value, dict):
        value = value.get("text", value.get("answers", []))
    if value is None:
        return []
    out = _as_list(value)
    return [a for a in out if a.strip()]


def qa_prompt(context: str | None, question: str) -> tuple[str, str]:
    """LongBench-style QA prompt split into (context part, question part)."""
    if context:
        return (
            context,
            "\n\nAnswer the question using only the text above, as briefly as possible.\n"
            f"Question: {question}\nAnswer:",
        )
    return "", f"Answer the question as briefly as possible.\nQuestion: {question}\nAnswer:"


def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    """Keep the first and last ``max_len / 2`` tokens (the LongBench convention)."""
    if max_len <= 0:
        return []
    if len(ids) <= max_len:
        return list(ids)
    head = max_len // 2
    return list(ids[:head]) + list(ids[len(ids) - (max_len - head) :])
