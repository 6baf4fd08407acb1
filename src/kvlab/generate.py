"""Cached generation: prefill the prompt, then decode one token at a time over the model's KV cache.

`prefill` and `decode_one_token` are small functions (gpt-fast style); `generate` runs the loop through
kvlab.decode's fast path (`Decoder.step`, optionally compiled: only the one-token step, as gpt-fast),
stops at EOS, and reports tokens/s for the decode phase.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch

from kvlab.cache import CacheError, KVCache
from kvlab.decode import Decoder
from kvlab.errors import KvlabError
from kvlab.inputs import check_token_ids
from kvlab.model import GPT


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, prompt + new) token ids
    new_tokens: int  # tokens generated per sequence
    prefill_s: float
    decode_s: float
    cache_bytes: int

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens (all sequences) per second after the prefill."""
        steps = self.new_tokens - 1  # the first new token comes out of the prefill
        return steps * self.tokens.shape[0] / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None):
    """logits (B, V) -> next tokens (B, 1). temperature 0 = greedy argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class GenerationError(KvlabError):
    """A generation option out of range (max_new_tokens, temperature, top_k, eos_token)."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_generation_options(model, idx, max_new_tokens, temperature, top_k, eos_token) -> None:
    """Once per generate() call, before anything runs: the options and the prompt's shape and ids."""
    check_token_ids(idx, model.config.vocab_size)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not 0 <= temperature < math.inf
    ):
        raise GenerationError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise GenerationError(f"top_k={top_k!r} must be an integer >= 1, or None for no top-k filter")
    vocab = model.config.vocab_size
    if eos_token is not None and (not _is_int(eos_token) or not 0 <= eos_token < vocab):
        raise GenerationError(
            f"eos_token={eos_token!r} must be a token id in the model's vocabulary [0, {vocab}), or None"
        )


def prefill(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt through the model into the cache; returns the last position's logits (B, V)."""
    return model(idx, cache=cache)[:, -1, :]


def decode_one_token(model: GPT, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token (B, 1) -> logits (B, V) for the next position."""
    return model(token, cache=cache)[:, -1, :]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token: int | None = None,
    cache_dtype: torch.dtype | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> GenerationResult:
    """Generate up to max_new_tokens after prompt idx (B, T) with a cache sized prompt + new tokens.

    compile=True compiles the decode step (torch.compile; the first steps pay the compilation, which
    decode_s includes)."""
    check_generation_options(model, idx, max_new_tokens, temperature, top_k, eos_token)
    B, T = idx.shape
    max_len = T + max_new_tokens
    if model.wpe is not None and max_len > model.config.block_size:
        raise CacheError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {max_len} exceeds the model's "
            f"block_size={model.config.block_size}; shorten the prompt or generate fewer tokens"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    cache = model.new_cache(batch_size=B, max_len=max_len, dtype=cache_dtype)
    decoder = Decoder(model, compile=compile)
    _sync(idx.device)
    t0 = time.perf_counter()
    next_tok = sample(prefill(model, idx, cache), temperature, top_k, generator)
    _sync(idx.device)
    t1 = time.perf_counter()
    out = [idx, next_tok]
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens - 1):
        if eos_token is not None:
            finished |= next_tok.squeeze(1) == eos_token
            if bool(finished.all()):
                break
        next_tok = sample(decoder.step(next_tok, cache), temperature, top_k, generator)
        if eos_token is not None:  # finished sequences keep emitting EOS
            next_tok = torch.where(finished[:, None], torch.full_like(next_tok, eos_token), next_tok)
        out.append(next_tok)
    _sync(idx.device)
    t2 = time.perf_counter()
    tokens = torch.cat(out, dim=1)
    return GenerationResult(tokens, tokens.shape[1] - T, t1 - t0, t2 - t1, cache.nbytes())
