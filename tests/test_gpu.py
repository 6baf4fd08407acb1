"""GPU paths CPU cannot show: bf16 caches and compute, flash SDPA, a compiled decode step.

Marked `gpu`: skipped without CUDA (CI), run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvlab import GPT, ModelConfig
from kvlab.decode import Decoder
from kvlab.generate import decode_one_token, generate

from conftest import VARIANTS, Widenings, tiny_config

pytestmark = pytest.mark.gpu
IDS = sorted(VARIANTS)


@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_bf16_cached_decode_matches_full_forward_on_gpu(name):
    model = GPT(tiny_config(VARIANTS[name])).cuda().to(torch.bfloat16).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    full = model(idx).float()
    before = torch.cuda.memory_allocated()
    cache = model.new_cache(batch_size=2, max_len=40, dtype=torch.bfloat16)
    assert torch.cuda.memory_allocated() - before >= cache.nbytes() > 0  # the cache lives on the GPU
    steps = [model(idx[:, :17], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(17, 40)]
    cached = torch.cat(steps, dim=1).float()
    # bf16 has ~3 significant digits; both paths round differently, so compare at bf16 resolution
    torch.testing.assert_close(cached, full, rtol=0.05, atol=0.05)
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.95
    assert cache.nbytes() == model.kv_cache_bytes(2, 40, torch.bfloat16)


@pytest.mark.parametrize("name", IDS)
@torch.inference_mode()
def test_bf16_decoder_fast_path_matches_full_forward_on_gpu(name):
    """kvlab.decode's fast path (what generate runs) on the GPU layouts, in bf16, against the full forward;
    and a ragged batch: each row starts with the token it gets alone (later tokens may part at bf16 ties)."""
    model = GPT(tiny_config(VARIANTS[name])).cuda().to(torch.bfloat16).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    full = model(idx).float()
    cache = model.new_cache(batch_size=2, max_len=40, dtype=torch.bfloat16)
    decoder = Decoder(model)
    decoder.check(cache, 2)
    steps = [model(idx[:, :17], cache=cache)]
    steps += [decoder.step(idx[:, t : t + 1], cache)[:, None] for t in range(17, 40)]
    cached = torch.cat(steps, dim=1).float()
    torch.testing.assert_close(cached, full, rtol=0.05, atol=0.05)
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.95
    prompts = [idx[0, :5], idx[1, :13]]
    rows = generate(model, prompts, 8).sequences()
    alone = [generate(model, p[None], 8).tokens[0].tolist() for p in prompts]
    assert [len(r) for r in rows] == [13, 21]
    firsts = [len(p) + 1 for p in prompts]  # prompt + first generated token
    assert [r[:n] for r, n in zip(rows, firsts)] == [a[:n] for a, n in zip(alone, firsts)]


@pytest.mark.parametrize("name", ["mha", "gqa", "matryoshka-mixed", "mla"])
@torch.inference_mode()
def test_fp32_model_attends_a_bf16_cache_in_bf16_on_gpu(name):
    """On a GPU a cache narrower than the compute is attended in its own dtype: no decode step widens the
    cache to float32 (only the token's query and result), and the steps match the full forward."""
    model = GPT(tiny_config(VARIANTS[name])).cuda().eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 48), device="cuda")
    full = model(idx)
    for fast in (False, True):
        cache = model.new_cache(batch_size=2, max_len=48, dtype=torch.bfloat16)
        decoder = Decoder(model)
        steps = [model(idx[:, :40], cache=cache)]
        mode = Widenings()
        with mode:
            for t in range(40, 48):
                tok = idx[:, t : t + 1]
                steps.append(decoder.step(tok, cache)[:, None] if fast else model(tok, cache=cache))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0.05, atol=0.05)
        if fast or name != "mla":  # MLA's forward path widens its latent; its decode step does not
            assert max(mode.widened, default=0) < 40 * 2 * 4, (fast, max(mode.widened))


@torch.inference_mode()
def test_flash_attention_backend_runs_the_full_forward():
    cfg = ModelConfig.preset("cpu-tiny", attention="gqa", vocab_size=512)
    model = GPT(cfg).cuda().to(torch.bfloat16).eval()
    idx = torch.randint(0, 512, (2, 128), device="cuda")
    ref = model(idx)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these shapes
        flash = model(idx)
    torch.testing.assert_close(flash.float(), ref.float(), rtol=0.02, atol=0.02)


@torch.inference_mode()
def test_compiled_decode_step_matches_eager():
    cfg = ModelConfig.preset("cpu-tiny", attention="gqa", vocab_size=512)
    model = GPT(cfg).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 512, (1, 16), device="cuda")
    eager = generate(model, prompt, 24).tokens
    step = torch.compile(decode_one_token, dynamic=True)
    cache = model.new_cache(batch_size=1, max_len=40)
    tok = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
    out = [prompt, tok]
    for _ in range(23):
        tok = step(model, tok, cache).argmax(-1, keepdim=True)
        out.append(tok)
    assert torch.equal(torch.cat(out, dim=1), eager)


@pytest.mark.parametrize("name", ["mha", "gqa", "mla", "matryoshka-mixed", "context-4"])
@torch.inference_mode()
def test_static_decode_runs_as_cuda_graphs(name):
    """generate(compile=True, static=True): the step compiles once (fullgraph, dynamic=False) and inductor
    runs it as CUDA graphs (no cudagraph skips: the cache's tensors are static addresses); its logits match
    the eager fast path at bf16 resolution."""
    from torch._dynamo.utils import counters

    model = GPT(tiny_config(VARIANTS[name])).cuda().to(torch.bfloat16).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    torch._dynamo.reset()
    counters.clear()
    outs = []
    for compile in (False, True):
        cache = model.new_cache(batch_size=2, max_len=48, dtype=torch.bfloat16)
        decoder = Decoder(model, compile=compile, static=compile)
        steps = [model(idx[:, :17], cache=cache)]
        steps += [decoder.step(idx[:, t : t + 1], cache)[:, None] for t in range(17, 40)]
        outs.append(torch.cat(steps, dim=1).float())
    torch.testing.assert_close(outs[1], outs[0], rtol=0.05, atol=0.05)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])


@pytest.mark.parametrize("name", ["mha", "matryoshka-mixed"])
def test_training_step_does_not_wait_for_the_host(name):
    """A training forward + backward launches without a device-host sync: Matryoshka's Cayley solve skips
    linalg.solve's error check and its rank masks are cached (copied from pinned memory when rebuilt)."""
    import torch.nn.functional as F

    model = GPT(tiny_config(VARIANTS[name])).cuda().train()
    idx = torch.randint(0, model.config.vocab_size, (2, 33), device="cuda")
    model(idx[:, :-1])  # warm-up: RoPE tables, masks, kernels, the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
