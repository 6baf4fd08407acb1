"""Per-family mappings between Hugging Face checkpoints and kvlab's GPT, in both directions.

One adapter per HF architecture: `config_from_hf` (HF config -> ModelConfig, refusing settings kvlab
would not reproduce), `state_from_hf` (HF tensors -> kvlab names and layouts), `hf_config` and
`state_to_hf` (the reverse). kvlab.convert.hf drives them and asserts every shape on the way.
"""

from __future__ import annotations

from typing import Any

import torch

from kvlab.config import AttentionConfig, ModelConfig
from kvlab.errors import KvlabError

State = dict[str, torch.Tensor]


class ConvertError(KvlabError):
    """A checkpoint kvlab cannot import or a model HF cannot express; the message names the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConvertError(message)


def _rope_scaling_from_hf(hc) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, kvlab rope_scaling or None, partial_rotary_factor) from a transformers config."""
    params = dict(getattr(hc, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", getattr(hc, "rope_theta", 10000.0)))
    pct = float(params.get("partial_rotary_factor", 1.0))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return theta, None, pct
    _require(
        rope_type in ("linear", "llama3"),
        f"HF rope type {rope_type!r} is not supported (kvlab reproduces default, linear and llama3 RoPE); "
        "convert a checkpoint without it",
    )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling = {"rope_type": rope_type, **{k: params[k] for k in keys if k in params}}
    return theta, scaling, pct


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        params.update(cfg.rope_scaling)
    return params


def _split_kv(kv: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kvlab's kv_proj rows are K heads then V heads: split into (K, V)."""
    return kv[:width], kv[width:]


# ---- GPT-2 ----------------------------------------------------------------------------------------
class GPT2:
    """GPT2LMHeadModel: Conv1D weights (in, out), fused c_attn (q | k | v), learned positions, tied head."""

    hf_class = "GPT2LMHeadModel"
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

    @classmethod
    def config_from_hf(cls, hc) -> ModelConfig:
        act = getattr(hc, "activation_function", "gelu_new")
        _require(
            act in cls.activations, f"HF GPT-2 activation_function={act!r} is not supported; use gelu_new"
        )
        for name, want in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("add_cross_attention", False),
        ):
            got = getattr(hc, name, want)
            _require(got == want, f"HF GPT-2 config {name}={got!r} is not supported (kvlab needs {want!r})")
        _require(
            (getattr(hc, "n_inner", None) or 4 * hc.n_embd) == 4 * hc.n_embd,
            f"HF GPT-2 n_inner={hc.n_inner} is not supported (kvlab's GPT-2 MLP is 4 * n_embd)",
        )
        return ModelConfig(
            family="gpt2", n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
            vocab_size=hc.vocab_size, bias=True, dropout=0.0, norm_eps=float(hc.layer_norm_epsilon),
            activation=cls.activations[act], tie_embeddings=True,
            attention=AttentionConfig(kind="gqa", n_kv_heads=hc.n_head),
        )  # fmt: skip

    @staticmethod
    def state_from_hf(hf: State, cfg: ModelConfig) -> State:
        C = cfg.n_embd
        out = {
            "wte.weight": hf["transformer.wte.weight"],
            "wpe.weight": hf["transformer.wpe.weight"],
            "ln_f.weight": hf["transformer.ln_f.weight"],
            "ln_f.bias": hf["transformer.ln_f.bias"],
            "lm_head.weight": hf.get("lm_head.weight", hf["transformer.wte.weight"]),
        }
        for i in range(cfg.n_layer):
            src, dst = f"transformer.h.{i}.", f"blocks.{i}."
            for ln in ("ln_1", "ln_2"):
                out[f"{dst}{ln}.weight"], out[f"{dst}{ln}.bias"] = (
                    hf[f"{src}{ln}.weight"],
                    hf[f"{src}{ln}.bias"],
                )
            w, b = hf[f"{src}attn.c_attn.weight"], hf[f"{src}attn.c_attn.bias"]  # Conv1D (C, 3C): q | k | v
            _require(
                tuple(w.shape) == (C, 3 * C),
                f"{src}attn.c_attn.weight has shape {tuple(w.shape)}, expected {(C, 3 * C)}",
            )
            out[f"{dst}attn.q_proj.weight"], out[f"{dst}attn.q_proj.bias"] = w[:, :C].t(), b[:C]
            out[f"{dst}attn.kv_proj.weight"], out[f"{dst}attn.kv_proj.bias"] = w[:, C:].t(), b[C:]
            for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out[f"{dst}{name}.weight"] = hf[f"{src}{name}.weight"].t()  # Conv1D (in, out) -> (out, in)
                out[f"{dst}{name}.bias"] = hf[f"{src}{name}.bias"]
        return out

    @staticmethod
    def hf_config(cfg: ModelConfig):
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=None, layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        )  # fmt: skip

    @staticmethod
    def state_to_hf(s: State, cfg: ModelConfig) -> State:
        C = cfg.n_embd
        out = {
            "transformer.wte.weight": s["wte.weight"],
            "transformer.wpe.weight": s["wpe.weight"],
            "transformer.ln_f.weight": s["ln_f.weight"],
            "transformer.ln_f.bias": s["ln_f.bias"],
            "lm_head.weight": s["wte.weight"],
        }
        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.", f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[f"{dst}{ln}.weight"], out[f"{dst}{ln}.bias"] = (
                    s[f"{src}{ln}.weight"],
                    s[f"{src}{ln}.bias"],
                )
            out[f"{dst}attn.c_attn.weight"] = torch.cat(
                [s[f"{src}attn.q_proj.weight"], s[f"{src}attn.kv_proj.weight"]]
            ).t()
            out[f"{dst}attn.c_attn.bias"] = torch.cat(
                [s[f"{src}attn.q_proj.bias"], s[f"{src}attn.kv_proj.bias"]]
            )
            for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out[f"{dst}{name}.weight"] = s[f"{src}{name}.weight"].t()
                out[f"{dst}{name}.bias"] = s[f"{src}{name}.bias"]
        assert C == s["wte.weight"].shape[1]
        return out


# ---- GPT-NeoX (Pythia) ----------------------------------------------------------------------------
class NeoX:
    """GPTNeoXForCausalLM: fused query_key_value interleaved per head (H, q|k|v, D), partial RoPE,
    parallel residual, untied embed_out."""

    hf_class = "GPTNeoXForCausalLM"
    activations = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

    @classmethod
    def config_from_hf(cls, hc) -> ModelConfig:
        act = hc.hidden_act
        _require(act in cls.activations, f"HF GPT-NeoX hidden_act={act!r} is not supported; kvlab has gelu")
        theta, scaling, pct = _rope_scaling_from_hf(hc)
        return ModelConfig(
            family="neox", n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads, n_embd=hc.hidden_size,
            intermediate_size=hc.intermediate_size, block_size=hc.max_position_embeddings,
            vocab_size=hc.vocab_size, bias=True, dropout=0.0, norm_eps=float(hc.layer_norm_eps),
            activation=cls.activations[act], parallel_residual=bool(hc.use_parallel_residual),
            rope_theta=theta, rotary_pct=pct, rope_scaling=scaling,
            tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)),
            attention=AttentionConfig(kind="gqa", n_kv_heads=hc.num_attention_heads),
        )  # fmt: skip

    @staticmethod
    def state_from_hf(hf: State, cfg: ModelConfig) -> State:
        H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
        out = {
            "wte.weight": hf["gpt_neox.embed_in.weight"],
            "ln_f.weight": hf["gpt_neox.final_layer_norm.weight"],
            "ln_f.bias": hf["gpt_neox.final_layer_norm.bias"],
            # transformers >= 5 names NeoX's untied head lm_head (older versions: embed_out)
            "lm_head.weight": hf["lm_head.weight"] if "lm_head.weight" in hf else hf["embed_out.weight"],
        }
        for i in range(cfg.n_layer):
            src, dst = f"gpt_neox.layers.{i}.", f"blocks.{i}."
            for hf_ln, ln in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
                for p in ("weight", "bias"):
                    out[f"{dst}{ln}.{p}"] = hf[f"{src}{hf_ln}.{p}"]
            w = hf[f"{src}attention.query_key_value.weight"]
            _require(
                tuple(w.shape) == (3 * C, C),
                f"{src}attention.query_key_value.weight has shape {tuple(w.shape)}, expected {(3 * C, C)}",
            )
            b = hf.get(f"{src}attention.query_key_value.bias", torch.zeros(3 * C, dtype=w.dtype))
            w, b = w.view(H, 3, D, C), b.view(H, 3, D)  # per head: q | k | v
            out[f"{dst}attn.q_proj.weight"], out[f"{dst}attn.q_proj.bias"] = (
                w[:, 0].reshape(C, C),
                b[:, 0].reshape(C),
            )
            out[f"{dst}attn.kv_proj.weight"] = torch.cat([w[:, 1].reshape(C, C), w[:, 2].reshape(C, C)])
            out[f"{dst}attn.kv_proj.bias"] = torch.cat([b[:, 1].reshape(C), b[:, 2].reshape(C)])
            out[f"{dst}attn.c_proj.weight"] = hf[f"{src}attention.dense.weight"]
            out[f"{dst}attn.c_proj.bias"] = hf.get(
                f"{src}attention.dense.bias", torch.zeros(C, dtype=w.dtype)
            )
            for hf_name, name in (("dense_h_to_4h", "c_fc"), ("dense_4h_to_h", "c_proj")):
                out[f"{dst}mlp.{name}.weight"] = hf[f"{src}mlp.{hf_name}.weight"]
                out[f"{dst}mlp.{name}.bias"] = hf[f"{src}mlp.{hf_name}.bias"]
        return out

    @staticmethod
    def hf_config(cfg: ModelConfig):
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, intermediate_size=cfg.mlp_width,
            hidden_act="gelu" if cfg.activation == "gelu" else "gelu_new",
            rope_parameters={**_rope_parameters(cfg), "partial_rotary_factor": cfg.rotary_pct},
            max_position_embeddings=cfg.block_size, layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_residual, attention_bias=True, attention_dropout=0.0,
            hidden_dropout=0.0, tie_word_embeddings=cfg.tie_embeddings,
        )  # fmt: skip

    @staticmethod
    def state_to_hf(s: State, cfg: ModelConfig) -> State:
        H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
        out = {
            "gpt_neox.embed_in.weight": s["wte.weight"],
            "gpt_neox.final_layer_norm.weight": s["ln_f.weight"],
            "gpt_neox.final_layer_norm.bias": s["ln_f.bias"],
            "lm_head.weight": s["lm_head.weight"],  # to_hf renames it for transformers < 5 (embed_out)
        }
        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.", f"gpt_neox.layers.{i}."
            for hf_ln, ln in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
                for p in ("weight", "bias"):
                    out[f"{dst}{hf_ln}.{p}"] = s[f"{src}{ln}.{p}"]
            k, v = _split_kv(s[f"{src}attn.kv_proj.weight"], C)
            qkv = torch.stack([t.view(H, D, C) for t in (s[f"{src}attn.q_proj.weight"], k, v)], dim=1)
            out[f"{dst}attention.query_key_value.weight"] = qkv.reshape(3 * C, C)  # (H, 3, D, C)
            kb, vb = _split_kv(s[f"{src}attn.kv_proj.bias"], C)
            qkv_b = torch.stack([t.view(H, D) for t in (s[f"{src}attn.q_proj.bias"], kb, vb)], dim=1)
            out[f"{dst}attention.query_key_value.bias"] = qkv_b.reshape(3 * C)
            out[f"{dst}attention.dense.weight"] = s[f"{src}attn.c_proj.weight"]
            out[f"{dst}attention.dense.bias"] = s[f"{src}attn.c_proj.bias"]
            for hf_name, name in (("dense_h_to_4h", "c_fc"), ("dense_4h_to_h", "c_proj")):
                out[f"{dst}mlp.{hf_name}.weight"] = s[f"{src}mlp.{name}.weight"]
                out[f"{dst}mlp.{hf_name}.bias"] = s[f"{src}mlp.{name}.bias"]
        return out


# ---- Llama (Llama 2/3, Mistral without sliding window, SmolLM2) -------------------------------------
def _llama_common(cfg: ModelConfig) -> dict[str, Any]:
    """Config fields LlamaConfig and DeepseekV3Config share."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps, rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu", attention_dropout=0.0,
    )  # fmt: skip


def _mlp_and_norms_from_hf(hf: State, out: State, cfg: ModelConfig, prefix: str = "model.") -> None:
    out["wte.weight"] = hf[f"{prefix}embed_tokens.weight"]
    out["ln_f.weight"] = hf[f"{prefix}norm.weight"]
    out["lm_head.weight"] = hf.get("lm_head.weight", hf[f"{prefix}embed_tokens.weight"])
    for i in range(cfg.n_layer):
        src, dst = f"{prefix}layers.{i}.", f"blocks.{i}."
        out[f"{dst}ln_1.weight"] = hf[f"{src}input_layernorm.weight"]
        out[f"{dst}ln_2.weight"] = hf[f"{src}post_attention_layernorm.weight"]
        for hf_name, name in (("gate_proj", "c_gate"), ("up_proj", "c_fc"), ("down_proj", "c_proj")):
            for p in ("weight", "bias"):
                if f"{src}mlp.{hf_name}.{p}" in hf:
                    out[f"{dst}mlp.{name}.{p}"] = hf[f"{src}mlp.{hf_name}.{p}"]


def _mlp_and_norms_to_hf(s: State, out: State, cfg: ModelConfig) -> None:
    out["model.embed_tokens.weight"] = s["wte.weight"]
    out["model.norm.weight"] = s["ln_f.weight"]
    out["lm_head.weight"] = s["lm_head.weight"]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[f"{dst}input_layernorm.weight"] = s[f"{src}ln_1.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = s[f"{src}ln_2.weight"]
        for hf_name, name in (("gate_proj", "c_gate"), ("up_proj", "c_fc"), ("down_proj", "c_proj")):
            for p in ("weight", "bias"):
                if f"{src}mlp.{name}.{p}" in s:
                    out[f"{dst}mlp.{hf_name}.{p}"] = s[f"{src}mlp.{name}.{p}"]


class Llama:
    """LlamaForCausalLM: separate q/k/v/o projections (GQA via num_key_value_heads), RMSNorm, SwiGLU,
    rotate-half RoPE on whole heads (HF's layout, so weights copy without permutation)."""

    hf_class = "LlamaForCausalLM"

    @staticmethod
    def config_from_hf(hc) -> ModelConfig:
        _require(
            hc.hidden_act == "silu", f"HF Llama hidden_act={hc.hidden_act!r} is not supported; kvlab has silu"
        )
        _require(
            getattr(hc, "sliding_window", None) is None,
            f"sliding_window={getattr(hc, 'sliding_window', None)} is not supported "
            "(kvlab attends to the whole context)",
        )
        head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        _require(
            head_dim * hc.num_attention_heads == hc.hidden_size,
            f"head_dim={head_dim} x {hc.num_attention_heads} heads != hidden_size={hc.hidden_size}; "
            "kvlab needs head_dim = hidden_size / num_attention_heads",
        )
        attn_bias, mlp_bias = bool(getattr(hc, "attention_bias", False)), bool(getattr(hc, "mlp_bias", False))
        _require(
            attn_bias == mlp_bias,
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
            "(kvlab's `bias` is one switch)",
        )
        theta, scaling, pct = _rope_scaling_from_hf(hc)
        return ModelConfig(
            family="llama", n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
            n_embd=hc.hidden_size,
            intermediate_size=hc.intermediate_size, block_size=hc.max_position_embeddings,
            vocab_size=hc.vocab_size, bias=attn_bias, dropout=0.0, norm_eps=float(hc.rms_norm_eps),
            rope_theta=theta, rotary_pct=pct, rope_scaling=scaling,
            tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)),
            attention=AttentionConfig(
                kind="gqa", n_kv_heads=hc.num_key_value_heads or hc.num_attention_heads
            ),
        )  # fmt: skip

    @staticmethod
    def state_from_hf(hf: State, cfg: ModelConfig) -> State:
        out: State = {}
        _mlp_and_norms_from_hf(hf, out, cfg)
        for i in range(cfg.n_layer):
            src, dst = f"model.layers.{i}.self_attn.", f"blocks.{i}.attn."
            for p in ("weight", "bias"):
                if f"{src}q_proj.{p}" in hf:
                    out[f"{dst}q_proj.{p}"] = hf[f"{src}q_proj.{p}"]
                    out[f"{dst}kv_proj.{p}"] = torch.cat([hf[f"{src}k_proj.{p}"], hf[f"{src}v_proj.{p}"]])
                    out[f"{dst}c_proj.{p}"] = hf[f"{src}o_proj.{p}"]
        return out

    @staticmethod
    def hf_config(cfg: ModelConfig):
        from transformers import LlamaConfig

        return LlamaConfig(
            **_llama_common(cfg), num_key_value_heads=cfg.attention.n_kv_heads or cfg.n_head,
            head_dim=cfg.head_dim, attention_bias=cfg.bias, mlp_bias=cfg.bias,
        )  # fmt: skip

    @staticmethod
    def state_to_hf(s: State, cfg: ModelConfig) -> State:
        out: State = {}
        _mlp_and_norms_to_hf(s, out, cfg)
        kv_width = (cfg.attention.n_kv_heads or cfg.n_head) * cfg.head_dim
        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.attn.", f"model.layers.{i}.self_attn."
            for p in ("weight", "bias"):
                if f"{src}q_proj.{p}" in s:
                    out[f"{dst}q_proj.{p}"] = s[f"{src}q_proj.{p}"]
                    out[f"{dst}k_proj.{p}"], out[f"{dst}v_proj.{p}"] = _split_kv(
                        s[f"{src}kv_proj.{p}"], kv_width
                    )
                    out[f"{dst}o_proj.{p}"] = s[f"{src}c_proj.{p}"]
        return out
