"""The invariants that define correctness, for every registered KV structure and combination, in every
model family (GPT-2 learned positions; NeoX and Llama RoPE, whose keys are cached post-RoPE).

1. cached prefill + step-by-step decode == the full forward (logits and greedy tokens), through
   GPT.forward and through the decode fast path (kvlab.decode.Decoder, what generate runs);
2. cache.nbytes() == model.kv_cache_bytes(...) exactly, and borrowing layers allocate nothing;
3. a layer that borrows KV behaves identically with and without the cache (covered by 1 for every
   kv_share variant, since borrowers read the owner's post-position keys on both paths).
"""

from __future__ import annotations

import pytest
import torch

import kvlab.attention.step as attention_step
from kvlab import GPT
from kvlab.attention.base import StaticDecodeError
from kvlab.cache import CacheError
from kvlab.decode import Decoder
from kvlab.generate import generate

from conftest import FAMILIES, VARIANTS, Widenings, tiny_config

IDS = sorted(VARIANTS)


FAMS = sorted(FAMILIES)


def _model(name: str, family: str = "gpt2") -> GPT:
    return GPT(tiny_config(VARIANTS[name], **FAMILIES[family])).eval()


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_cached_decode_matches_full_forward(name, family):
    model = _model(name, family)
    B, T, t0 = 2, 23, 9
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    full = model(idx)
    cache = model.new_cache(batch_size=B, max_len=T, dtype=torch.float32)
    steps = [model(idx[:, :t0], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(t0, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == T


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("relayout", [True, False])
@torch.inference_mode()
def test_decoder_steps_match_full_forward(name, family, relayout):
    """The fast path (each structure's `decode`, weights re-laid out for GEMV or not) == the full forward."""
    model = _model(name, family)
    B, T, t0 = 2, 23, 9
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    full = model(idx)
    cache = model.new_cache(batch_size=B, max_len=T, dtype=torch.float32)
    decoder = Decoder(model, relayout=relayout)
    decoder.check(cache, B)
    steps = [model(idx[:, :t0], cache=cache)]
    steps += [decoder.step(idx[:, t : t + 1], cache)[:, None] for t in range(t0, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == T
    assert cache.nbytes() == model.kv_cache_bytes(batch_size=B, max_len=T, dtype=torch.float32)


@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_decoder_from_the_first_token_and_with_a_short_cache(name):
    """Decoding from position 0 (MLA's unabsorbed first step) and in a cache too short for a Context-KV
    slot to complete (no ring, no ContextBlock) still equals the full forward."""
    model = _model(name)
    idx = torch.randint(0, model.config.vocab_size, (1, 3))
    cache = model.new_cache(batch_size=1, max_len=3, dtype=torch.float32)
    decoder = Decoder(model)
    steps = [decoder.step(idx[:, t : t + 1], cache)[:, None] for t in range(3)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_decoder_reads_a_narrower_cache(name):
    """A bfloat16 cache under a float32 model: the fast path and GPT.forward read the same rounded K/V."""
    model = _model(name)
    idx = torch.randint(0, model.config.vocab_size, (2, 14))
    outs = []
    for fast in (False, True):
        cache = model.new_cache(batch_size=2, max_len=14, dtype=torch.bfloat16)
        decoder = Decoder(model)
        steps = [model(idx[:, :6], cache=cache)]
        for t in range(6, 14):
            tok = idx[:, t : t + 1]
            steps.append(decoder.step(tok, cache)[:, None] if fast else model(tok, cache=cache))
        outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("widen", [True, False])
@torch.inference_mode()
def test_narrow_cache_is_attended_in_its_dtype(name, widen, monkeypatch):
    """A bfloat16 cache under a float32 model. Where the device attends in the cache's dtype (GPUs; here
    forced on the CPU by emptying WIDENING_DEVICES), no decode step converts a cached layer's K/V to
    float32, only the one token's query and result, and the steps still match the widened ones at bfloat16
    resolution; where it widens (the CPU), the whole cache is converted, which is what the first half
    detects. Context-KV gathers its bounded window per step and widens that; it is not counted."""
    if not widen:
        monkeypatch.setattr(attention_step, "WIDENING_DEVICES", frozenset())
    model = _model(name)
    B, T, t0 = 2, 48, 40
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    ref_cache = model.new_cache(batch_size=B, max_len=T, dtype=torch.bfloat16)
    ref = model(idx, cache=ref_cache)  # prefill of every token over the bf16 cache, float32 compute
    for fast in (False, True):
        cache = model.new_cache(batch_size=B, max_len=T, dtype=torch.bfloat16)
        decoder = Decoder(model)
        steps = [model(idx[:, :t0], cache=cache)]
        states = [layer for layer in cache.states if layer is not None]
        tensors = [t for layer in states for t in getattr(layer, "tensors", {}).values()]
        held = min((t.numel() // T for t in tensors), default=0)  # elements a token adds to a cached tensor
        mode = Widenings()
        with mode:
            for t in range(t0, T):
                tok = idx[:, t : t + 1]
                steps.append(decoder.step(tok, cache)[:, None] if fast else model(tok, cache=cache))
        out = torch.cat(steps, dim=1)
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
        widest = max(mode.widened, default=0)
        if name.startswith("context"):
            continue
        attn = model.blocks[0].attn
        # MLA's own decode reads the latent in attend_dtype; with per-head RoPE keys it runs forward
        absorbed_step = attn.kind == "mla" and attn.rope_heads == 1
        narrow_path = not widen and (attn.attends_any_cache_dtype or (fast and absorbed_step))
        if narrow_path:
            assert widest < t0 * held, f"{'fast' if fast else 'forward'}: widened {widest} elements"
        else:
            assert widest >= t0 * held


# Structures whose decode step runs forward's general path, which has no static formulation.
NO_STATIC = {"mla-rope-heads"}


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_static_decoder_steps_match_full_forward(name, family):
    """A static step (the whole cache read with a mask, writes through index_copy_, the position a
    tensor: what CUDA graphs capture) == the full forward; a structure without one says so in one line."""
    model = _model(name, family)
    B, T, t0 = 2, 23, 9
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    full = model(idx)
    cache = model.new_cache(batch_size=B, max_len=T + 4, dtype=torch.float32)  # room the mask must hide
    decoder = Decoder(model, static=True)
    steps = [model(idx[:, :t0], cache=cache)]
    if name in NO_STATIC:
        with pytest.raises(StaticDecodeError, match="no static decode step; decode without static=True"):
            decoder.step(idx[:, t0 : t0 + 1], cache)
        return
    steps += [decoder.step(idx[:, t : t + 1], cache)[:, None] for t in range(t0, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == T


@pytest.mark.parametrize("name", ["gqa", "mla", "matryoshka-mixed", "context-4"])
def test_static_step_marks_what_it_reads_in_place(name):
    """What CUDA graphs must read where it is (Decoder.mark_static, run before the first graphed step):
    every cache tensor, the position, the weight table and the RoPE tables / cached bases modules hold."""
    model = _model(name, "llama")  # built outside inference mode, as a trained model is
    with torch.inference_mode():
        cache = model.new_cache(batch_size=2, max_len=12, dtype=torch.float32)
        decoder = Decoder(model, static=True)
        model(torch.randint(0, model.config.vocab_size, (2, 5)), cache=cache)
        decoder.step(torch.zeros(2, 1, dtype=torch.long), cache)  # the eager first step fills the tables
        decoder.mark_static(cache)
    marked = lambda t: getattr(t, "_dynamo_static_input_type", None) == "unguarded"  # noqa: E731
    held = [t for s in cache.states if s is not None for t in getattr(s, "tensors", vars(s)).values()]
    assert held and all(marked(t) for t in held)
    assert marked(decoder._pos)
    assert decoder.linear.table and all(marked(w_t) for w_t, _ in decoder.linear.table.values())
    attn = model.blocks[0].attn
    rope = attn.decoupled_rope if attn.kind == "mla" else attn.rotary
    assert rope._tables and all(marked(t) for pair in rope._tables.values() for t in pair)
    if attn.kind == "matryoshka":
        assert all(marked(u) for u in attn._bases_cache[1])  # the bases the eager step solved


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gqa", "matryoshka-mixed"])
def test_graphed_step_bookkeeping_runs_compiled(name):
    """The CUDA-graph step's bookkeeping (static marks on the cache and tables, a step boundary per call,
    the logits cloned) around the compiled static step, on the CPU where inductor makes no graphs: the
    tokens are the eager ones and the marks cause no recompile across steps or a second cache."""
    from torch._dynamo.utils import counters

    model = _model(name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    eager = generate(model, prompt, max_new_tokens=10).tokens
    torch._dynamo.reset()
    counters.clear()
    decoder = Decoder(model, compile=True, static=True)
    decoder._graphs = True  # what a CUDA model sets; mode stays inductor's default here
    with torch.inference_mode():
        for _ in range(2):  # a second cache: new addresses, unguarded marks
            cache = model.new_cache(batch_size=1, max_len=16, dtype=torch.float32)
            out = [prompt, model(prompt, cache=cache)[:, -1:].argmax(-1)]
            for _ in range(9):
                out.append(decoder.step(out[-1], cache).argmax(-1, keepdim=True))
            assert torch.equal(torch.cat(out, dim=1), eager)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_static_decoding_needs_a_kvlab_gpt():
    with pytest.raises(StaticDecodeError, match="static decoding needs a kvlab GPT"):
        Decoder(torch.nn.Linear(2, 2), static=True)


def test_decoder_refuses_a_full_cache():
    model = _model("gqa")
    cache = model.new_cache(batch_size=1, max_len=2, dtype=torch.float32)
    decoder = Decoder(model)
    with torch.inference_mode():
        decoder.step(torch.zeros(1, 1, dtype=torch.long), cache)
        decoder.step(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(CacheError, match="full"):
            decoder.step(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.slow  # torch.compile of the step: tens of seconds on 2 busy cores
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("name", ["gqa", "mla", "matryoshka-mixed", "context-4"])
@torch.inference_mode()
def test_compiled_decoder_matches_eager(name, static):
    """The compiled step gives the eager tokens, and compiles to one graph for every position (no recompile
    per step: the step indexes its caches with slices, so pos stays symbolic; Context-KV's compiled step is
    its static-shape `static_step`). A static step compiles with dynamic=False and fullgraph=True, as CUDA
    graphs need: the position is a tensor, so nothing specialises on it."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _model(name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    eager = generate(model, prompt, max_new_tokens=12)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, prompt, max_new_tokens=12, compile=True, static=static)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # static: fullgraph, no breaks


@pytest.mark.slow  # torch.compile of the step
@pytest.mark.parametrize("name", ["gqa", "mla"])
@torch.inference_mode()
def test_compiled_decoder_does_not_recompile_as_rope_tables_grow(name):
    """RoPE's cos/sin tables grow by doubling as positions pass their length (64, 128, ...). The compiled
    step must not be where they grow: a traced growth guards on the table's size and specialises on the
    position it happened at, so every doubling recompiled the step (and enough of them reached dynamo's
    recompile limit, after which the step ran eagerly without a word). The Decoder reserves the tables
    for the whole cache before its compiled steps; here the generation crosses the 64-entry boundary."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = GPT(tiny_config(VARIANTS[name], **dict(FAMILIES["llama"], block_size=160))).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 58))
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, prompt, max_new_tokens=80, compile=True)  # first: the tables are 64 long
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert torch.equal(compiled.tokens, generate(model, prompt, max_new_tokens=80).tokens)


@pytest.mark.slow  # torch.compile of the step
@pytest.mark.parametrize("name", ["gqa", "context-4"])
@torch.inference_mode()
def test_compiled_decoder_is_one_graph_for_a_ragged_batch(name):
    """A ragged batch starts decoding at its shortest prompt, here before Context-KV's first slot is
    complete, so the first (eager) step skips the ContextBlock and never puts its linears in the weight
    table. The compiled step guards on that table; it is filled with every Linear before the compiled
    steps take over, so the block's first use does not recompile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _model(name)
    prompts = [torch.randint(0, model.config.vocab_size, (n,)) for n in (2, 9, 5)]
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, prompts, max_new_tokens=20, compile=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert compiled.sequences() == generate(model, prompts, max_new_tokens=20).sequences()


@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_chunked_prefill_matches_full_forward(name):
    """Multi-token appends that start mid-sequence (pos > 0, T > 1) use the offset causal mask."""
    model = _model(name)
    idx = torch.randint(0, model.config.vocab_size, (1, 30))
    full = model(idx)
    cache = model.new_cache(batch_size=1, max_len=30, dtype=torch.float32)
    parts = [model(idx[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 19), (19, 30))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_greedy_tokens_match_uncached(name, family):
    model = _model(name, family)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    cached = generate(model, prompt, max_new_tokens=12).tokens
    ref = prompt
    for _ in range(12):  # cache-free greedy decoding: rerun the whole context each step
        ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ref)


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_ragged_batch_rows_match_alone(name, family):
    """Prompts of different lengths in one batch: each row's tokens are the ones it gets alone (the
    shorter rows generate while the longer ones are still fed their prompts, all at one position)."""
    model = _model(name, family)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)) for n in (3, 11, 7)]
    batch = generate(model, prompts, max_new_tokens=9)
    assert batch.lengths == [12, 20, 16] and batch.tokens.shape == (3, 20)
    for p, row, padded in zip(prompts, batch.sequences(), batch.tokens):
        alone = generate(model, p[None], max_new_tokens=9).tokens[0]
        assert row == alone.tolist()
        assert torch.equal(padded[len(row) :], torch.zeros(20 - len(row), dtype=torch.long))
    assert batch.decoded_tokens == 3 * 9 - 1  # the shortest row's first token came from the prefill


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_measured_cache_bytes_equal_analytic(name, dtype, family):
    model = _model(name, family)
    for B, max_len in ((1, 17), (3, 64)):
        cache = model.new_cache(batch_size=B, max_len=max_len, dtype=dtype)
        model(torch.randint(0, model.config.vocab_size, (B, 5)), cache=cache)  # a real prefill
        assert cache.nbytes() == model.kv_cache_bytes(batch_size=B, max_len=max_len, dtype=dtype)
        for i, state in enumerate(cache.states):  # borrowing layers allocate nothing
            assert (state is None) == (model.owners[i] != i)
            assert (model.blocks[i].attn.cache_bytes(B, max_len, dtype) == 0) == (model.owners[i] != i)


@pytest.mark.parametrize("name", IDS)
def test_kv_bytes_per_token_equals_cache_growth(name):
    """kv_bytes_per_token_total is exactly what a real cache grows by per token, for structures that cache
    every token; a Context-KV layer keeps a bounded ring of context slots, so there it is an upper bound."""
    model = _model(name)
    m = model.kv_metrics(torch.float32)
    grow = model.new_cache(1, 64, torch.float32).nbytes() - model.new_cache(1, 32, torch.float32).nbytes()
    bounded = any(model.config.attention.for_layer(i).kind == "context" for i in range(model.config.n_layer))
    if bounded:
        assert 0 <= grow <= 32 * m["kv_bytes_per_token_total"]
    else:
        assert grow == 32 * m["kv_bytes_per_token_total"] > 0


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("name", IDS)
def test_training_step_reduces_loss(name, family):
    """Every structure trains: a few AdamW steps on one batch lower its loss (gradients reach all owners)."""
    model = _model(name, family).train()
    idx = torch.randint(0, model.config.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("family", ["neox", "llama"])
@pytest.mark.parametrize("name", ["mha", "gqa+cla2", "matryoshka+gqa"])
@torch.inference_mode()
def test_rope_families_cache_post_rope_keys(name, family):
    """The cache holds keys rotated to their absolute positions: equal to rotating the layer's raw keys,
    and different from the unrotated ones (so a borrower cannot be reading pre-RoPE keys)."""
    model = _model(name, family)
    idx = torch.randint(0, model.config.vocab_size, (1, 11))
    cache = model.new_cache(batch_size=1, max_len=11, dtype=torch.float32)
    model(idx, cache=cache)
    attn = model.blocks[0].attn
    x = model.blocks[0].ln_1(model.wte(idx))
    B, T, _ = x.shape
    raw_k = attn.kv_proj(x).view(B, T, 2, attn.n_kv_heads, attn.head_dim)[:, :, 0].transpose(1, 2)
    rotated = attn.rotary(raw_k, 0)
    held = cache.states[0].tensors
    if "k" in held:
        torch.testing.assert_close(held["k"], rotated, rtol=1e-6, atol=1e-6)
    else:  # Matryoshka caches coefficients of the post-RoPE keys
        c_k, _ = attn._full_coefficients(rotated, rotated, *attn.bases())
        r_k, _, heads = attn.rank_groups()[0]
        torch.testing.assert_close(held["k0"], c_k[:, heads, :, :r_k], rtol=1e-5, atol=1e-5)
    assert (rotated[:, :, 1:] - raw_k[:, :, 1:]).abs().max() > 1e-3  # position 0 is not rotated
