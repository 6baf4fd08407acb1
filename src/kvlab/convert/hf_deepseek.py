"""DeepSeek-V3's MLA (`DeepseekV3ForCausalLM`) as an HF family: what a Llama-family kvlab MLA model
exports to and imports from (kvlab.convert.hf). Its norms, MLP and RoPE scaling are Llama's
(kvlab.convert.hf_families)."""

from __future__ import annotations

from kvlab.config import AttentionConfig, ModelConfig
from kvlab.convert.hf_families import (
    State,
    _llama_common,
    _mlp_and_norms_from_hf,
    _mlp_and_norms_to_hf,
    _require,
    _rope_scaling_from_hf,
)


class DeepSeekMLA:
    """DeepseekV3ForCausalLM with every layer dense (first_k_dense_replace = n_layer) and rotate-half RoPE
    (rope_interleave=False): its kv_a_proj_with_mqa / kv_b_proj / q_a_proj / q_b_proj are kvlab MLA's kv_a
    / kv_b / q_a / q_b in the same layouts (latent then RoPE key; per head k_nope then v)."""

    hf_class = "DeepseekV3ForCausalLM"
    _names = (("q_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("q_b", "q_b_proj"), ("q_proj", "q_proj"),
              ("kv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("kv_b", "kv_b_proj"),
              ("c_proj", "o_proj"))  # fmt: skip

    @staticmethod
    def config_from_hf(hc) -> ModelConfig:
        _require(
            hc.first_k_dense_replace >= hc.num_hidden_layers,
            "DeepSeek checkpoints with mixture-of-experts layers are not supported (kvlab's MLP is dense); "
            "only first_k_dense_replace >= num_hidden_layers imports",
        )
        _require(
            not hc.rope_interleave, "rope_interleave=True is not supported; export with rope_interleave=False"
        )
        _require(
            hc.qk_nope_head_dim == hc.v_head_dim == hc.hidden_size // hc.num_attention_heads,
            "kvlab's MLA needs qk_nope_head_dim == v_head_dim == hidden_size / num_attention_heads",
        )
        _require(not hc.attention_bias, "attention_bias=True is not supported for DeepSeek MLA")
        theta, scaling, _ = _rope_scaling_from_hf(hc)
        return ModelConfig(
            family="llama", n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
            n_embd=hc.hidden_size,
            intermediate_size=hc.intermediate_size, block_size=hc.max_position_embeddings,
            vocab_size=hc.vocab_size, bias=False, dropout=0.0, norm_eps=float(hc.rms_norm_eps),
            rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hc.tie_word_embeddings),
            attention=AttentionConfig(
                kind="mla", kv_rank=hc.kv_lora_rank, rope_dim=hc.qk_rope_head_dim, q_rank=hc.q_lora_rank
            ),
        )  # fmt: skip

    @classmethod
    def state_from_hf(cls, hf: State, cfg: ModelConfig) -> State:
        out: State = {}
        _mlp_and_norms_from_hf(hf, out, cfg)
        for i in range(cfg.n_layer):
            for ours, theirs in cls._names:
                key = f"model.layers.{i}.self_attn.{theirs}.weight"
                if key in hf:
                    out[f"blocks.{i}.attn.{ours}.weight"] = hf[key]
        return out

    @staticmethod
    def hf_config(cfg: ModelConfig):
        from transformers import DeepseekV3Config

        att = cfg.attention
        return DeepseekV3Config(
            **_llama_common(cfg), num_key_value_heads=cfg.n_head, q_lora_rank=att.q_rank,
            kv_lora_rank=att.kv_rank, qk_rope_head_dim=att.rope_dim, qk_nope_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim, first_k_dense_replace=cfg.n_layer, rope_interleave=False,
            attention_bias=False, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        )  # fmt: skip

    @classmethod
    def state_to_hf(cls, s: State, cfg: ModelConfig) -> State:
        out: State = {}
        _mlp_and_norms_to_hf(s, out, cfg)
        for i in range(cfg.n_layer):
            for ours, theirs in cls._names:
                if f"blocks.{i}.attn.{ours}.weight" in s:
                    out[f"model.layers.{i}.self_attn.{theirs}.weight"] = s[f"blocks.{i}.attn.{ours}.weight"]
        return out
