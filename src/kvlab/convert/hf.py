"""Hugging Face checkpoints in and out: `from_hf` (GPT-2, GPT-NeoX, Llama and what loads as them, and
kvlab's own DeepSeek MLA exports) and `to_hf` / `export_hf` (back to each model's HF class).

Tensors move key by key through the per-family adapters in hf_families; every shape is checked, every
HF tensor must find its place and every kvlab tensor must be filled (no `strict=False`), so an imported
model reproduces HF's logits and `from_hf(to_hf(m))` returns the same weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvlab.config import ConfigError, ModelConfig
from kvlab.convert.hf_deepseek import DeepSeekMLA
from kvlab.convert.hf_families import GPT2, ConvertError, Llama, NeoX
from kvlab.convert.hf_load import NOT_WEIGHTS as _NOT_WEIGHTS
from kvlab.convert.hf_load import importer as _importer
from kvlab.convert.hf_load import load_hf_model, quiet_transformers
from kvlab.model import GPT

__all__ = ["ConvertError", "from_hf", "to_hf", "export_hf", "load_hf_model", "hf_counterpart"]


@torch.no_grad()
def from_hf(source: Any) -> GPT:
    """A kvlab GPT with the same weights and logits as an HF causal LM (an in-memory model, or a local
    directory, optionally written `hf:DIR`). The result is in eval mode, on the source's device and dtype."""
    hf_model = load_hf_model(source) if isinstance(source, (str, Path)) else source
    adapter = _importer(getattr(hf_model.config, "model_type", type(hf_model).__name__))
    try:
        cfg = adapter.config_from_hf(hf_model.config)
    except ConfigError as e:
        raise ConvertError(f"the HF config does not make a valid kvlab model: {e}") from None
    hf_state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith(_NOT_WEIGHTS)}
    used = _Recorder(hf_state)
    try:
        mapped = adapter.state_from_hf(used, cfg)
    except KeyError as e:
        raise ConvertError(f"the HF checkpoint lacks tensor {e.args[0]!r} that its config implies") from None
    unused = sorted(set(hf_state) - used.read)
    if cfg.tie_embeddings and "lm_head.weight" in unused:
        emb = mapped["wte.weight"]
        if not torch.equal(hf_state["lm_head.weight"], emb):
            raise ConvertError("tie_word_embeddings is set but lm_head.weight differs from the embeddings")
        unused.remove("lm_head.weight")
    if unused:
        raise ConvertError(f"HF tensors {unused[:4]} have no place in kvlab's {cfg.family} model")
    ref = next(iter(hf_state.values()))
    return build_model(cfg, mapped, device=ref.device, dtype=ref.dtype).eval()


class _Recorder(dict):
    """A dict that remembers which keys were read (so no HF tensor is silently dropped)."""

    def __init__(self, d):
        super().__init__(d)
        self.read: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k in self:
            return self[k]
        return default

    def __contains__(self, k):
        return super().__contains__(k)


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], device=None, dtype=None) -> GPT:
    """GPT(cfg) holding exactly `tensors` (every parameter and buffer, each shape checked), built on the meta
    device and filled by assignment, so a 135M model does not pay for a random init it overwrites."""
    with torch.device("meta"):
        model = GPT(cfg)
    want = model.state_dict()
    if cfg.tie_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        want.pop("lm_head.weight")
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise ConvertError(f"tensors do not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    state = {}
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(want[name].shape):
            raise ConvertError(
                f"{name} has shape {tuple(t.shape)}, the model expects {tuple(want[name].shape)}"
            )
        state[name] = t.detach().to(device=device, dtype=dtype or t.dtype).clone().contiguous()
    model.load_state_dict(state, strict=False, assign=True)  # every key checked above; tie restored below
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model


# ---- export --------------------------------------------------------------------------------------
def hf_counterpart(cfg: ModelConfig):
    """The adapter that exports `cfg` to transformers, or a one-line ConvertError naming what HF lacks."""
    att = cfg.attention
    if att.layers:
        kinds = sorted({c.kind for c in att.layers.values()})
        raise ConvertError(f"per-layer attention overrides ({', '.join(kinds)}) have no HF counterpart; "
                           "export with --format kvlab")  # fmt: skip
    if att.kv_share != "none":
        raise ConvertError(f"cross-layer KV sharing (kv_share={att.kv_share!r}) has no HF counterpart; "
                           "export with --format kvlab")  # fmt: skip
    no_hf = {"matryoshka": "MatryoshkaKV's nested-rank projections", "context": "Context-KV's context slots"}
    if att.kind in no_hf:
        raise ConvertError(f"{no_hf[att.kind]} have no HF counterpart; export with --format kvlab")
    fam = cfg.family
    checks: list[tuple[bool, str]] = []
    if fam == "gpt2":
        adapter = GPT2
        checks = [
            (att.kind == "gqa" and (att.n_kv_heads or cfg.n_head) == cfg.n_head, "GPT-2 in HF has MHA only"),
            (cfg.activation in ("gelu", "gelu_tanh") and not cfg.gated_mlp, "GPT-2's MLP is GELU"),
            (cfg.intermediate_size in (None, 4 * cfg.n_embd), "GPT-2's MLP is 4 * n_embd wide"),
            (
                cfg.positions == "learned" and cfg.norm == "layernorm",
                "GPT-2 has learned positions and LayerNorm",
            ),
            (cfg.tie_embeddings and not cfg.parallel_residual, "GPT-2 ties its head and is sequential"),
        ]
    elif fam == "neox":
        adapter = NeoX
        checks = [
            (
                att.kind == "gqa" and (att.n_kv_heads or cfg.n_head) == cfg.n_head,
                "GPT-NeoX in HF has MHA only",
            ),
            (cfg.activation in ("gelu", "gelu_tanh") and not cfg.gated_mlp, "GPT-NeoX's MLP is GELU"),
            (cfg.positions == "rope" and cfg.norm == "layernorm", "GPT-NeoX has RoPE and LayerNorm"),
        ]
    elif fam == "llama":
        adapter = DeepSeekMLA if att.kind == "mla" else Llama
        checks = [
            (cfg.activation == "silu" and cfg.gated_mlp, "Llama's MLP is SwiGLU"),
            (cfg.positions == "rope" and cfg.norm == "rmsnorm", "Llama has RoPE and RMSNorm"),
            (not cfg.parallel_residual, "Llama is sequential"),
        ]
        if att.kind == "mla":
            checks += [
                (not cfg.bias, "DeepSeek MLA has no biases"),
                (att.rope_theta in (None, cfg.rope_theta), "DeepSeek MLA uses the model's rope_theta"),
                # what kvlab.convert.mla gives a converted model (per-KV-head RoPE keys at chosen
                # frequencies, a linear latent) has no place in DeepSeek's layout
                ((att.rope_heads or 1) == 1, f"DeepSeek MLA has one RoPE key shared by all heads, this "
                 f"model {att.rope_heads} (one per KV head, as to_mla converts)"),
                (att.rope_pairs is None, "DeepSeek MLA rotates all of its RoPE key's frequencies, this model "
                 "a chosen subset (rope_pairs, as to_mla converts)"),
                (att.latent_norm is not False, "DeepSeek MLA normalises its latent (kv_a_layernorm), this "
                 "model does not (latent_norm=False, as to_mla converts)"),
            ]  # fmt: skip
        else:
            checks.append((cfg.rotary_pct == 1.0, "Llama rotates whole heads (rotary_pct=1)"))
    else:  # pragma: no cover - ModelConfig validates family
        raise ConvertError(f"family {fam!r} has no HF export")
    for ok, why in checks:
        if not ok:
            raise ConvertError(f"this {fam} model cannot be exported to {adapter.hf_class}: {why}; "
                               "export with --format kvlab")  # fmt: skip
    return adapter


def _with_zero_biases(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 and NeoX in HF always have biases: a bias-free kvlab model exports them as zeros (exact)."""
    if cfg.bias or cfg.family == "llama":
        return state
    out = dict(state)
    for name, t in state.items():
        if name.endswith(".weight") and t.dim() >= 1 and name.rsplit(".", 2)[-2] != "wte":
            bias = name[: -len("weight")] + "bias"
            if bias not in out and not name.startswith(("wte", "wpe", "lm_head")):
                out[bias] = torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
    return out


@torch.no_grad()
def to_hf(model: GPT):
    """The transformers model (GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM with its KV heads, or
    DeepseekV3ForCausalLM for Llama-family MLA) with the same weights; eval mode, float32 unless the model
    is in another dtype. Structures HF cannot express raise one ConvertError line."""
    import transformers

    cfg = model.config
    adapter = hf_counterpart(cfg)
    hc = adapter.hf_config(cfg)
    ref = model.wte.weight
    hf_model = getattr(transformers, adapter.hf_class)(hc).to(device=ref.device, dtype=ref.dtype)
    state = _with_zero_biases(model.state_dict(), cfg)
    mapped = adapter.state_to_hf(state, cfg)
    want = hf_model.state_dict()
    want = {k: v for k, v in want.items() if not k.endswith(_NOT_WEIGHTS)}
    if "embed_out.weight" in want and "lm_head.weight" in mapped:  # GPT-NeoX before transformers 5
        mapped["embed_out.weight"] = mapped.pop("lm_head.weight")
    missing, extra = sorted(set(want) - set(mapped)), sorted(set(mapped) - set(want))
    if missing or extra:  # a kvlab bug, not a user mistake: the adapters must cover every tensor
        raise AssertionError(f"to_hf: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, t in mapped.items():
        assert tuple(t.shape) == tuple(want[name].shape), (
            f"to_hf: {name} {tuple(t.shape)} != {tuple(want[name].shape)}"
        )
    hf_model.load_state_dict({k: v.contiguous() for k, v in mapped.items()}, strict=False)
    if getattr(hc, "tie_word_embeddings", False):
        hf_model.tie_weights()
    return hf_model.eval()


def export_hf(model: GPT, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `to_hf(model)` with save_pretrained (safetensors) into out_dir, atomically: the directory
    appears complete or not at all. Tokenizer files found in tokenizer_dir are copied beside it."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} already exists and is not an empty directory; choose a new output path")
    hf_model = to_hf(model)  # refuses unsupported structures before anything is written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ConvertError(
            f"cannot write to {out.parent}: {e.strerror or e}; choose a writable path"
        ) from None
    try:
        with quiet_transformers():  # no progress bar: the command prints one line when done
            hf_model.save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConvertError(f"writing {out} failed: {e.strerror or e}; nothing was written") from None
    return out
