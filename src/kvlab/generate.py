"""Cached generation: prefill the prompt, then decode one token at a time over the model's KV cache.

`prefill` and `decode_one_token` are small functions (gpt-fast style); `generate` runs the loop through
kvlab.decode's fast path (`Decoder.step`, optionally compiled: only the one-token step, as gpt-fast),
stops at EOS, and reports tokens/s for the decode phase.

Prompts of different lengths batch without padding or masks: every row starts at position 0, the batch
prefills the shortest prompt's length together, and the decode steps feed each longer prompt's remaining
tokens (teacher-forced) while the shorter rows already generate. All rows stay at the same position, so
each KV structure's cache and its decode path work unchanged (Context-KV's strided slots, shared layers,
RoPE and learned positions included), and each row's tokens are those it would get alone.
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
from kvlab.inputs import InputError, check_token_ids
from kvlab.model import GPT


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, longest prompt + new) token ids; a row shorter than that ends in pad ids
    new_tokens: int  # tokens generated per sequence (the most any row generated)
    prefill_s: float
    decode_s: float
    cache_bytes: int
    lengths: list[int] | None = None  # per row: prompt + generated tokens, the rest of the row is padding
    decoded_tokens: int | None = None  # generated tokens that came out of decode steps (not the prefill)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens (all sequences) per second after the prefill."""
        decoded = self.decoded_tokens
        if decoded is None:  # a rectangular batch: the first new token comes out of the prefill
            decoded = max(self.new_tokens - 1, 0) * self.tokens.shape[0]
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0

    def sequences(self) -> list[list[int]]:
        """Each row's prompt + generated ids, without padding (a row that hit EOS ends with it)."""
        lengths = self.lengths or [self.tokens.shape[1]] * self.tokens.shape[0]
        return [row[:n] for row, n in zip(self.tokens.tolist(), lengths)]


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


# The Decoder's (in, out) weight copies (kvlab.decode) cost about as much as 14-18 decode steps save
# (measured on 2 CPU cores: 12 ms against 0.65 ms per step at 4 x 256, 220 ms against 16 ms on SmolLM2-135M),
# so a generation with fewer decode steps than this reads the weights as they are.
RELAYOUT_MIN_STEPS = 24


class GenerationError(KvlabError):
    """A generation option out of range (max_new_tokens, temperature, top_k, eos_token)."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def as_prompt_batch(prompts, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """A (B, T) tensor, or a list of prompts of any lengths (each a 1-D tensor or a list of ids) ->
    (B, longest) long tensor, right-padded with 0, and each row's prompt length."""
    if isinstance(prompts, torch.Tensor):
        check_token_ids(prompts, vocab_size)
        return prompts, [prompts.shape[1]] * prompts.shape[0]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(
            f"prompts must be a (B, T) tensor of token ids or a non-empty list of token-id sequences, "
            f"got {type(prompts).__name__}{' (empty)' if isinstance(prompts, (list, tuple)) else ''}"
        )
    rows = []
    for i, p in enumerate(prompts):
        try:
            t = p if isinstance(p, torch.Tensor) else torch.as_tensor(p)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"prompt {i} is not a sequence of token ids ({e})") from e
        if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise InputError(
                f"prompt {i} must be a non-empty 1-D sequence of integer token ids, "
                f"got shape {tuple(t.shape)} of {t.dtype}"
            )
        rows.append(t.to(device=device, dtype=torch.long))
    lengths = [len(r) for r in rows]
    padded = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    check_token_ids(padded, vocab_size)
    return padded, lengths


def check_generation_options(model, idx, max_new_tokens, temperature, top_k, eos_token) -> None:
    """Once per generate() call, before anything runs: the options (the prompts: as_prompt_batch)."""
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
    idx: torch.Tensor | list,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token: int | None = None,
    cache_dtype: torch.dtype | None = None,
    seed: int | None = None,
    compile: bool = False,
    static: bool = False,
) -> GenerationResult:
    """Generate up to max_new_tokens after each prompt: idx is a (B, T) tensor, or a list of prompts of any
    lengths (1-D tensors or lists of ids), in a cache sized longest prompt + new tokens.

    Every row generates max_new_tokens (fewer after EOS; a finished row repeats EOS until the batch
    stops). `tokens` holds each row's prompt and generated ids from position 0, right-padded (with
    eos_token, else 0) to the longest row; `lengths` / `sequences()` give each row without padding.
    compile=True compiles the decode step (torch.compile; the first steps pay the compilation, which
    decode_s includes). static=True decodes over the whole preallocated cache with a mask and the position
    as a tensor (kvlab.decode.Decoder), so the step's shapes never change: with compile=True on a GPU it
    runs as CUDA graphs (gpt-fast's static cache)."""
    device = idx.device if isinstance(idx, torch.Tensor) else next(model.parameters()).device
    idx, lengths = as_prompt_batch(idx, model.config.vocab_size, device)
    check_generation_options(model, idx, max_new_tokens, temperature, top_k, eos_token)
    B, T = idx.shape  # T: the longest prompt
    first = min(lengths)  # the prefill covers every row's first `first` tokens
    max_len = T + max_new_tokens
    if model.wpe is not None and max_len > model.config.block_size:
        longest = "prompt" if first == T else "longest prompt"
        raise CacheError(
            f"{longest} ({T} tokens) + max_new_tokens ({max_new_tokens}) = {max_len} exceeds the model's "
            f"block_size={model.config.block_size}; shorten the prompt or generate fewer tokens"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    cache = model.new_cache(batch_size=B, max_len=max_len, dtype=cache_dtype)
    steps = T - first + max_new_tokens - 1  # decode steps at most: the longer prompts' tails, then generation
    relayout = None if steps >= RELAYOUT_MIN_STEPS else False
    decoder = Decoder(model, compile=compile, static=static, relayout=relayout)
    prompt_len = torch.tensor(lengths, device=idx.device)
    ends = prompt_len + max_new_tokens  # per row: where its tokens end (earlier at EOS)
    out = [idx[:, :first]]
    _sync(idx.device)
    t0 = time.perf_counter()
    logits = prefill(model, idx[:, :first], cache)
    _sync(idx.device)
    t1 = time.perf_counter()
    pos = first  # the position the next token goes to; every row is there
    while True:
        tok = sample(logits, temperature, top_k, generator)  # (B, 1)
        if pos < T:  # rows still inside their prompt take its next token instead
            tok = torch.where((prompt_len <= pos)[:, None], tok, idx[:, pos : pos + 1])
        if eos_token is not None:
            ended = ends <= pos  # at EOS, or at its length (what such a row emits now is padding)
            tok = tok.masked_fill(ended[:, None], eos_token)  # an ended row repeats EOS
            stops = (tok.squeeze(1) == eos_token) & (prompt_len <= pos) & ~ended
            ends = ends.masked_fill(stops, pos + 1)
        out.append(tok)
        pos += 1
        if pos == T + max_new_tokens:
            break
        if eos_token is not None and bool((ends <= pos).all()):  # every row ended (EOS or its length)
            break
        logits = decoder.step(tok, cache)
    _sync(idx.device)
    t2 = time.perf_counter()
    tokens = torch.cat(out, dim=1)
    ends = ends.clamp(max=pos)
    if first < T or eos_token is not None:  # pad each row after its end
        width = int(ends.max())
        tokens = tokens[:, :width]
        past = torch.arange(width, device=tokens.device)[None, :] >= ends[:, None]
        tokens = tokens.masked_fill(past, eos_token if eos_token is not None else 0)
    row_ends = ends.tolist()
    new = [e - n for e, n in zip(row_ends, lengths)]
    # generated tokens out of decode steps: each row's [max(prompt, first + 1), end)
    decoded = sum(max(e - max(n, first + 1), 0) for e, n in zip(row_ends, lengths))
    return GenerationResult(
        tokens, max(new), t1 - t0, t2 - t1, cache.nbytes(), lengths=row_ends, decoded_tokens=decoded
    )
