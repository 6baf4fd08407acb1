"""Language-modelling losses: nanoGPT val_loss, seed 000's held-out loss, and lm-eval's scoring.

`loglikelihood_tokens` scores (context, continuation) token pairs exactly as lm-evaluation-harness's
HF backend does (left-truncate to max_length + 1, score the continuation's positions); the rolling
windows behind its `wikitext` task and the word/byte perplexity aggregation are built on it here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kvlab.errors import KvlabError
from kvlab.train import batches


class EvalError(KvlabError):
    """Unusable evaluation input (a split too short, an empty corpus); the message says what to do."""


def _as_tensor(tokens) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens.long()
    return torch.from_numpy(np.asarray(tokens).astype(np.int64))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def val_loss(
    model, tokens, block_size: int, batch_size: int, eval_iters: int, generator: torch.Generator | None = None
) -> float:
    """nanoGPT's estimate, by the training loop's own definition (`kvlab.train.batches.val_loss`): with
    the run's generator (seed train.seed + VAL_SEED_OFFSET) it reproduces training's val_loss exactly."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return batches.val_loss(model, tokens, block_size, batch_size, eval_iters, generator)


@torch.inference_mode()
def heldout_loss(
    model, tokens, block_size: int, batch_size: int = 8, max_windows: int | None = None
) -> float:
    """Seed 000: token cross-entropy over non-overlapping block_size windows (a partial tail is dropped).

    Window w reads tokens[w*T : w*T + T] and predicts tokens[w*T + 1 : w*T + T + 1]; every window is
    full length, so the mean over tokens equals the mean over windows.
    """
    data = _as_tensor(tokens)
    n_windows = (len(data) - 1) // block_size
    if n_windows < 1:
        raise EvalError(
            f"the held-out split has {len(data)} tokens; it needs at least block_size + 1 = {block_size + 1}"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        w = torch.arange(start, min(start + batch_size, n_windows))
        offsets = w[:, None] * block_size + torch.arange(block_size)[None, :]  # (B, T)
        x, y = data[offsets].to(device), data[offsets + 1].to(device)
        logits = model(x).float()  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


# ---- lm-eval scoring ------------------------------------------------------------------------------
@torch.inference_mode()
def loglikelihood_tokens(
    model, requests: Sequence[tuple[list[int], list[int]]], max_length: int, batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(context, continuation) token lists -> (sum log p(continuation | context), every token greedy).

    As lm-eval's HF backend: the model reads (context + continuation)[-(max_length + 1):][:-1] and the
    last len(continuation) positions are scored. Requests are batched by length with right padding,
    which a causal model never sees from earlier positions.
    """
    device = _device(model)
    inputs = []
    for context, continuation in requests:
        if not continuation:
            raise EvalError("a continuation encodes to zero tokens; nothing to score")
        if len(continuation) > max_length:  # lm-eval's HF backend asserts the same
            raise EvalError(
                f"a continuation of {len(continuation)} tokens is longer than the model's context "
                f"({max_length}); score it with a longer-context model or drop that item"
            )
        inputs.append(((list(context) + list(continuation))[-(max_length + 1) :][:-1], list(continuation)))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    for b in range(0, len(order), batch_size):
        idxs = order[b : b + batch_size]
        width = len(inputs[idxs[0]][0])
        batch = torch.zeros(len(idxs), width, dtype=torch.long)
        for row, i in enumerate(idxs):
            inp = inputs[i][0]
            batch[row, : len(inp)] = torch.tensor(inp)
        logprobs = F.log_softmax(model(batch.to(device)).float(), dim=-1)  # (B, T, V)
        for row, i in enumerate(idxs):
            inp, cont = inputs[i]
            n = len(cont)
            lp = logprobs[row, len(inp) - n : len(inp)]  # (n, V): positions predicting cont
            target = torch.tensor(cont, device=device)
            greedy = bool((lp.argmax(dim=-1) == target).all())
            results[i] = (float(lp.gather(1, target[:, None]).sum()), greedy)
    return results


def get_rolling_token_windows(
    token_list: list[int], prefix_token: int, max_seq_len: int, context_len: int = 1
):
    """lm-eval's rolling windows: (input tokens, predicted tokens); every token is predicted once.

    The first window reads prefix_token + tokens[:max_seq_len - 1]; each later window predicts the next
    max_seq_len - context_len + 1 tokens, reading the max_seq_len tokens that end just before its last
    prediction (so the final, shorter window sees more of the preceding text).
    """
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"context_len={context_len} must be between 1 and max_seq_len={max_seq_len}")
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first - 1], token_list[:first]
    predicted = first
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[max(0, window_end - max_seq_len - 1) : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """Turn a rolling window into (context, continuation) that do not overlap (lm-eval)."""
    inp, pred = pair
    return inp[: len(inp) - (len(pred) - 1)], pred


def rolling_loglikelihood(
    model, token_lists: Sequence[list[int]], max_length: int, prefix_token: int, batch_size: int = 16
) -> list[float]:
    """lm-eval `loglikelihood_rolling`: each document's total log-likelihood over disjoint windows."""
    requests, owner = [], []
    for d, tokens in enumerate(token_lists):
        for window in get_rolling_token_windows(list(tokens), prefix_token, max_length, context_len=1):
            requests.append(make_disjoint_window(window))
            owner.append(d)
    scores = loglikelihood_tokens(model, requests, max_length, batch_size)
    totals = [0.0] * len(token_lists)
    for d, (ll, _) in zip(owner, scores):
        totals[d] += ll
    return totals


def wikitext_detokenize(string: str) -> str:
    """lm-eval's wikitext detokenizer (undo WikiText's ' @-@ ', ' , ' ... spacing) before scoring."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        string = string.replace(a, b)
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "==")):
        string = string.replace(a, b)
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


def perplexity_from_loglikelihoods(
    documents: Sequence[str], loglikelihoods: Sequence[float]
) -> dict[str, float]:
    """lm-eval `wikitext` aggregation over documents (words and bytes counted on the original text).

    word_perplexity = exp(-sum ll / sum words), words = len(re.split(r"\\s+", doc));
    byte_perplexity = exp(-sum ll / sum bytes), bytes = len(doc.encode("utf-8"));
    bits_per_byte = -sum ll / sum bytes / ln 2.
    """
    total_ll = float(sum(loglikelihoods))
    words = sum(len(re.split(r"\s+", doc)) for doc in documents)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    return {
        "word_perplexity": math.exp(-total_ll / words),
        "byte_perplexity": math.exp(-total_ll / n_bytes),
        "bits_per_byte": -total_ll / n_bytes / math.log(2),
    }


def document_perplexity(
    model,
    tokenizer,
    documents: Sequence[str],
    max_length: int,
    detokenize: bool = False,
    batch_size: int = 16,
) -> dict[str, float]:
    """WikiText-style metrics of whole documents: rolling log-likelihood + word/byte perplexity.

    detokenize=True applies lm-eval's wikitext detokenizer to the scored text (word and byte counts
    still come from the original document, as lm-eval counts them). Blank documents are kept, as
    lm-eval keeps them: no tokens to score, but each counts one word (re.split of "" gives [""]).
    """
    documents = list(documents)
    if not any(d.strip() for d in documents):
        raise EvalError("no non-empty documents to score")
    prefix = getattr(tokenizer, "eot_token", None)
    if prefix is None:
        raise EvalError(
            "the tokenizer has no eot_token; rolling log-likelihood needs it as the first context"
        )
    texts = [wikitext_detokenize(d) if detokenize else d for d in documents]
    token_lists = [tokenizer.encode(t) for t in texts]
    lls = rolling_loglikelihood(model, token_lists, max_length, prefix, batch_size)
    metrics = perplexity_from_loglikelihoods(documents, lls)
    metrics["documents"] = len(documents)
    metrics["document_tokens"] = sum(len(t) for t in token_lists)
    return metrics
