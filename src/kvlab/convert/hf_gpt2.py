"""Hugging Face GPT-2 checkpoints -> kvlab GPT (MHA, biases, tanh GELU), copied key by key.

HF's GPT-2 stores its projections as Conv1D, (in, out), the transpose of nn.Linear, and packs q, k, v
into one c_attn; kvlab splits that into q_proj and kv_proj (K rows first, then V). Every shape is
asserted, so the converted model reproduces the checkpoint's logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvlab.config import AttentionConfig, ModelConfig
from kvlab.errors import KvlabError
from kvlab.model import GPT


class ConvertError(KvlabError):
    """A checkpoint kvlab cannot import; the message names the setting and the fix."""


def _check_hf_config(hc) -> None:
    """Reject GPT-2 variants whose computation kvlab's GPT does not reproduce."""
    checks = [
        ("layer_norm_epsilon", getattr(hc, "layer_norm_epsilon", 1e-5), 1e-5),
        ("activation_function", getattr(hc, "activation_function", "gelu_new"), "gelu_new"),
        ("n_inner", getattr(hc, "n_inner", None) or 4 * hc.n_embd, 4 * hc.n_embd),
        ("scale_attn_weights", getattr(hc, "scale_attn_weights", True), True),
        ("scale_attn_by_inverse_layer_idx", getattr(hc, "scale_attn_by_inverse_layer_idx", False), False),
        ("add_cross_attention", getattr(hc, "add_cross_attention", False), False),
    ]
    for name, got, want in checks:
        if got != want:
            raise ConvertError(
                f"HF GPT-2 config {name}={got!r} is not supported (kvlab's GPT-2 needs {want!r}); "
                "convert a standard GPT-2 checkpoint"
            )


def config_from_hf(hc) -> ModelConfig:
    """The kvlab ModelConfig of a transformers GPT2Config (MHA, biases, gelu_tanh, no dropout)."""
    _check_hf_config(hc)
    return ModelConfig(
        n_layer=hc.n_layer,
        n_head=hc.n_head,
        n_embd=hc.n_embd,
        block_size=hc.n_positions,
        vocab_size=hc.vocab_size,
        bias=True,
        dropout=0.0,  # a converted model is for evaluation/uptraining; set dropout when fine-tuning
        family="gpt2",
        activation="gelu_tanh",
        attention=AttentionConfig(kind="gqa", n_kv_heads=hc.n_head),
    )


def _hf_to_kvlab_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map HF tensor names and layouts onto kvlab's, transposing Conv1D weights to nn.Linear's (out, in)."""
    C = cfg.n_embd
    out = {
        "wte.weight": hf_state["transformer.wte.weight"],
        "wpe.weight": hf_state["transformer.wpe.weight"],
        "ln_f.weight": hf_state["transformer.ln_f.weight"],
        "ln_f.bias": hf_state["transformer.ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        src, dst = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                out[f"{dst}{ln}.{p}"] = hf_state[f"{src}{ln}.{p}"]
        w_attn = hf_state[f"{src}attn.c_attn.weight"]  # Conv1D: (C, 3C), columns q | k | v
        b_attn = hf_state[f"{src}attn.c_attn.bias"]  # (3C,)
        if tuple(w_attn.shape) != (C, 3 * C):
            raise ConvertError(
                f"{src}attn.c_attn.weight has shape {tuple(w_attn.shape)}, expected {(C, 3 * C)}"
            )
        out[f"{dst}attn.q_proj.weight"] = w_attn[:, :C].t()  # (C, C)
        out[f"{dst}attn.q_proj.bias"] = b_attn[:C]
        out[f"{dst}attn.kv_proj.weight"] = w_attn[:, C:].t()  # (2C, C): K rows then V rows, heads in order
        out[f"{dst}attn.kv_proj.bias"] = b_attn[C:]
        for hf_name, kv_name in (
            ("attn.c_proj", "attn.c_proj"),
            ("mlp.c_fc", "mlp.c_fc"),
            ("mlp.c_proj", "mlp.c_proj"),
        ):
            out[f"{dst}{kv_name}.weight"] = hf_state[
                f"{src}{hf_name}.weight"
            ].t()  # Conv1D (in, out) -> (out, in)
            out[f"{dst}{kv_name}.bias"] = hf_state[f"{src}{hf_name}.bias"]
    return out


@torch.no_grad()
def from_hf_gpt2(hf_model) -> GPT:
    """Convert an in-memory `transformers.GPT2LMHeadModel` into a kvlab GPT with identical logits.

    The result is in eval mode, on the HF model's device and dtype. The LM head is tied to wte, as in
    GPT-2; an HF model with an untied head that differs from wte is refused.
    """
    cfg = config_from_hf(hf_model.config)
    hf_state = hf_model.state_dict()
    if "lm_head.weight" in hf_state and not torch.equal(
        hf_state["lm_head.weight"], hf_state["transformer.wte.weight"]
    ):
        raise ConvertError("HF model's lm_head.weight differs from transformer.wte.weight; kvlab ties them")
    mapped = _hf_to_kvlab_state(hf_state, cfg)
    ref = hf_state["transformer.wte.weight"]
    model = GPT(cfg).to(device=ref.device, dtype=ref.dtype)
    state = model.state_dict()
    expected = set(state) - {"lm_head.weight"}  # tied: loaded through wte.weight
    assert set(mapped) == expected, f"from_hf_gpt2: unmapped tensors {sorted(expected ^ set(mapped))[:4]}"
    for name, tensor in mapped.items():
        shape, want = tuple(tensor.shape), tuple(state[name].shape)
        assert shape == want, f"from_hf_gpt2: {name} has shape {shape}, kvlab expects {want}"
        state[name] = tensor.detach().clone().contiguous()
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight is model.wte.weight
    return model.eval()


def load_hf_gpt2(name_or_path: str | Path) -> GPT:
    """Load a GPT-2 checkpoint with `GPT2LMHeadModel.from_pretrained` and convert it (see from_hf_gpt2).

    Offline, only a local directory (config.json + weights) works; a hub name fails with a one-line error.
    """
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ConvertError(
            f"loading HF checkpoints needs transformers ({e}); pip install transformers"
        ) from e
    local = Path(name_or_path).is_dir()
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(str(name_or_path), local_files_only=local)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the Hugging Face hub (unreachable here?)"
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"cannot load GPT-2 checkpoint {str(name_or_path)!r} from {where}: {first}; "
            "pass a local directory holding config.json and model.safetensors"
        ) from None
    return from_hf_gpt2(hf_model.eval())
