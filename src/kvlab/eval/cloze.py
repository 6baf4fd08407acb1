"""Last-word (LAMBADA) evaluation by lm-eval's `lambada_openai` rule, and an offline cloze set.

A passage's context is its text minus the last space-separated word and the target is " " + that word;
accuracy = every target token is the greedy argmax, perplexity = exp(-mean target log-likelihood).
`cloze_set_from_documents` cuts passages with the same shape from held-out text, so the metric works
with no hub; the real EleutherAI/lambada_openai is used when kvlab.data can load it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from kvlab.eval.lm import EvalError, loglikelihood_tokens

# A target worth predicting: a word of letters (inner apostrophes/hyphens allowed), at least 2 long;
# punctuation-only, numeric and one-letter targets ("a", "I") would make accuracy trivially high or noisy.
# Trailing punctuation is cut off, as LAMBADA passages end on the bare word ("... said Harry").
_TARGET_WORD = re.compile(r"([A-Za-z][A-Za-z'\-]*[A-Za-z])[.,;:!?\"')\]]*")


def split_cloze(passage: str) -> tuple[str, str]:
    """lm-eval lambada_openai: context = all but the last ' '-separated word, target = ' ' + last word."""
    words = passage.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: move trailing spaces of the context onto the continuation, encode the
    whole string, and take the continuation as the tokens after the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    context_enc = list(tokenizer.encode(context))
    return context_enc, whole[len(context_enc) :]


def lambada_metrics(
    model, tokenizer, passages: Sequence[str], max_length: int, batch_size: int = 16
) -> dict[str, float]:
    """Accuracy and perplexity over passages (lm-eval `lambada_openai` definitions)."""
    if not passages:
        raise EvalError("no cloze passages to score")
    requests = []
    prefix = getattr(tokenizer, "eot_token", None)
    for passage in passages:
        context, target = split_cloze(passage)
        if context == "":  # lm-eval conditions an empty context on the prefix (end-of-text) token
            if prefix is None:
                raise EvalError(f"passage {passage[:40]!r} has no context and the tokenizer no eot_token")
            requests.append(([prefix], list(tokenizer.encode(target))))
        else:
            requests.append(encode_pair(tokenizer, context, target))
    scores = loglikelihood_tokens(model, requests, max_length, batch_size)
    lls = [ll for ll, _ in scores]
    return {
        "lambada_accuracy": sum(greedy for _, greedy in scores) / len(scores),
        "lambada_perplexity": math.exp(-sum(lls) / len(lls)),
        "lambada_passages": len(scores),
    }


def cloze_set_from_documents(
    documents: Sequence[str],
    n: int = 500,
    min_context_words: int = 40,
    seed: int = 0,
    max_context_words: int | None = None,
    target_in_context: bool = True,
) -> list[str]:
    """Build up to n LAMBADA-style passages from held-out documents by the lambada_openai rule.

    Each passage is a run of whole words (whitespace normalised to single spaces, so the ' ' split is
    exact) ending on a target word that matches _TARGET_WORD (its trailing punctuation cut), with
    min_context_words to
    max_context_words (default 2x min) words before it. target_in_context keeps only targets that
    occur earlier in the passage, LAMBADA's proxy for "guessable from the broad context". Passages do
    not overlap; the set is a deterministic function of (documents, n, the word limits, seed).
    """
    if n < 1 or min_context_words < 1:
        raise EvalError(f"n={n} and min_context_words={min_context_words} must be at least 1")
    max_context_words = max_context_words or 2 * min_context_words
    if max_context_words < min_context_words:
        raise EvalError(
            f"max_context_words={max_context_words} is below min_context_words={min_context_words}"
        )
    rng = random.Random(seed)
    docs = [doc.split() for doc in documents]
    candidates = []  # (document, index of the target word)
    for d, words in enumerate(docs):
        for end in range(min_context_words, len(words)):
            if _TARGET_WORD.fullmatch(words[end]):
                candidates.append((d, end))
    rng.shuffle(candidates)
    taken: dict[int, list[tuple[int, int]]] = {}
    passages: list[tuple[int, int, int]] = []
    for d, end in candidates:
        if len(passages) >= n:
            break
        words = docs[d]
        start = max(0, end - rng.randint(min_context_words, max_context_words))
        if any(s <= end and start <= e for s, e in taken.get(d, [])):
            continue  # overlaps a passage already taken
        target = _TARGET_WORD.fullmatch(words[end]).group(1)
        if target_in_context:
            if not any(w.strip(".,;:!?\"'()[]").lower() == target.lower() for w in words[start:end]):
                continue
        taken.setdefault(d, []).append((start, end))
        passages.append((d, start, end, target))
    passages.sort()
    return [" ".join([*docs[d][start:end], target]) for d, start, end, target in passages]
