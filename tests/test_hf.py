"""HF checkpoints in and out for every family: imported models reproduce HF's logits, exports reproduce
kvlab's, `from_hf(to_hf(m))` returns the same tensors, and bad checkpoints get one line. Tiny random HF
models built from configs: nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.testing import assert_close

from kvlab import GPT, AttentionConfig, ModelConfig
from kvlab.convert import ConvertError, export_hf, from_hf, to_hf

from conftest import tiny_config

TIGHT = dict(rtol=1e-5, atol=1e-5)
VOCAB = 101


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """HF zero-inits biases and unit-inits norms: perturb every tensor so each one is tested."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _gpt2(**kw):
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **kw)
    )


def _neox(**kw):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**fields, **kw}))


def _llama(**kw):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **kw}))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}  # fmt: skip
HF_MODELS = {
    "gpt2": lambda: _gpt2(),
    "gpt2-exact-gelu-eps": lambda: _gpt2(activation_function="gelu", layer_norm_epsilon=1e-6),
    "pythia": lambda: _neox(),  # parallel residual, 25% rotary (2 of 8 dims)
    "neox-sequential-half-rotary": lambda: _neox(use_parallel_residual=False, rotary_pct=0.5),
    "llama-gqa": lambda: _llama(),
    "llama-mqa-tied-llama3-rope": lambda: _llama(
        num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=LLAMA3, rope_theta=5000.0
    ),
    "llama-biases": lambda: _llama(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
@torch.no_grad()
def test_import_reproduces_hf_logits_and_export_round_trips(name):
    torch.manual_seed(0)
    hf = _randomise(HF_MODELS[name]())
    idx = torch.randint(0, VOCAB, (2, 19))
    want = hf(idx).logits
    model = from_hf(hf)
    assert_close(model(idx), want, **TIGHT)
    cache = model.new_cache(batch_size=2, max_len=19)  # the imported model decodes with its cache too
    steps = [model(idx[:, :7], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(7, 19)]
    assert_close(torch.cat(steps, dim=1), want, **TIGHT)
    back = to_hf(model)
    assert type(back).__name__ == type(hf).__name__
    assert_close(back(idx).logits, want, **TIGHT)
    again = from_hf(back)
    assert again.config == model.config
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in again.state_dict().items())


def test_imported_configs_say_what_they_are():
    pythia = from_hf(_neox()).config
    assert (pythia.family, pythia.parallel_residual, pythia.rope_dim, pythia.tie_embeddings) == (
        "neox",
        True,
        2,
        False,
    )
    llama = from_hf(_llama(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=LLAMA3)).config
    assert llama.attention.n_kv_heads == 1 and llama.tie_embeddings and llama.rope_scaling["factor"] == 8.0
    assert (llama.norm, llama.gated_mlp, llama.activation) == ("rmsnorm", True, "silu")


@pytest.mark.parametrize(
    "attention",
    [
        "mla",  # seed 000's MLA: low-rank query
        AttentionConfig(kind="mla", kv_rank=16, rope_dim=4),  # full-rank query
        AttentionConfig(kind="gqa", n_kv_heads=1),
    ],
)
@torch.no_grad()
def test_llama_family_reduced_models_export_to_hf_classes(attention):
    """A Llama-family MLA model becomes DeepseekV3ForCausalLM (what MLA serving engines load), GQA/MQA a
    LlamaForCausalLM with num_key_value_heads; logits equal, and importing the export gives it back."""
    cfg = tiny_config(attention, family="llama", bias=False, intermediate_size=48)
    model = _randomise(GPT(cfg))
    hf = to_hf(model)
    kind = cfg.attention.kind
    assert type(hf).__name__ == ("DeepseekV3ForCausalLM" if kind == "mla" else "LlamaForCausalLM")
    idx = torch.randint(0, cfg.vocab_size, (2, 13))
    assert_close(hf(idx).logits, model(idx), **TIGHT)
    if kind == "mla":
        assert hf.config.kv_lora_rank == cfg.attention.kv_rank and hf.config.first_k_dense_replace == 4
    else:
        assert hf.config.num_key_value_heads == 1
    again = from_hf(hf)
    assert again.config.attention == cfg.attention
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in again.state_dict().items())


@torch.no_grad()
def test_nanogpt_style_gpt2_without_biases_exports_with_zero_biases():
    model = _randomise(GPT(tiny_config("mha", bias=False)))
    idx = torch.randint(0, 97, (1, 12))
    assert_close(to_hf(model)(idx).logits, model(idx), **TIGHT)


@pytest.mark.parametrize(
    "attention, family, what",
    [
        ("cla2", "llama", "cross-layer KV sharing"),
        ("matryoshka-4", "llama", "MatryoshkaKV"),
        ("context-4", "gpt2", "Context-KV"),
        ("gqa", "gpt2", "GPT-2 in HF has MHA only"),
        ("gqa", "neox", "GPT-NeoX in HF has MHA only"),
        ("mla", "gpt2", "GPT-2 in HF has MHA only"),
    ],
)
def test_structures_without_hf_counterpart_get_one_line(attention, family, what):
    model = GPT(tiny_config(attention, family=family, bias=family != "llama"))
    with pytest.raises(ConvertError) as e:
        to_hf(model)
    assert what in str(e.value) and "--format kvlab" in str(e.value) and "\n" not in str(e.value)


def test_directories_in_and_out(tmp_path):
    torch.manual_seed(0)
    hf = _randomise(_llama())
    hf.save_pretrained(tmp_path / "llama")
    model = from_hf(f"hf:{tmp_path / 'llama'}")
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert_close(model(idx), hf(idx).logits, **TIGHT)
    out = export_hf(model, tmp_path / "exported")
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".exported.*"))
    with torch.no_grad():
        assert_close(from_hf(out)(idx), hf(idx).logits, **TIGHT)
    with pytest.raises(ConvertError, match="not an empty directory"):
        export_hf(model, out)  # never overwrites


def _one_line_error(source, match):
    with pytest.raises(ConvertError) as e:
        from_hf(source)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_checkpoints_get_one_line(tmp_path):
    _one_line_error(tmp_path / "missing", "not a Hugging Face model directory")
    hf = _llama()
    hf.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    _one_line_error(tmp_path / "ok", "missing or truncated")
    bert = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    bert.save_pretrained(tmp_path / "bert")
    _one_line_error(tmp_path / "bert", "model_type='bert' is not supported")
    _one_line_error(_gpt2(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx")
    _one_line_error(_llama(head_dim=16), "head_dim=16")


def _saved_llama(tmp_path, name="llama"):
    hf = _randomise(_llama())
    hf.save_pretrained(tmp_path / name)
    return hf, tmp_path / name


def _edit_config(directory, **fields):
    import json

    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "field, value, tensor, shapes, fix",
    [  # _llama(): hidden 32, 4 heads of 8, 2 KV heads, intermediate 48, 2 layers, vocab 101
        ("intermediate_size", 64, "mlp.down_proj.weight", "(32, 48) in the checkpoint but config.json makes "
         "it (32, 64) (and 5 more)", "set intermediate_size to 48 in config.json (it says 64)"),
        ("num_key_value_heads", 4, "self_attn.k_proj.weight", "(16, 32) in the checkpoint but config.json "
         "makes it (32, 32) (and 3 more)", "set num_key_value_heads to 2 in config.json (it says 4)"),
        ("vocab_size", 120, "lm_head.weight", "(101, 32) in the checkpoint but config.json makes it "
         "(120, 32) (and 1 more)", "set vocab_size to 101 in config.json (it says 120)"),
    ],
)  # fmt: skip
def test_config_that_disagrees_with_its_weights_names_tensor_shapes_and_field(
    tmp_path, capfd, field, value, tensor, shapes, fix
):
    """transformers prints an 11-line LOAD REPORT and raises "ignore_mismatched_sizes"; kvlab says, in one
    line and nothing else on the terminal, which tensor, both shapes and the config.json field to fix."""
    _, directory = _saved_llama(tmp_path)
    _edit_config(directory, **{field: value})
    capfd.readouterr()
    with pytest.raises(ConvertError) as e:
        from_hf(f"hf:{directory}")
    msg = str(e.value)
    assert "\n" not in msg and "config.json does not match the weights" in msg, msg
    assert f"{tensor} has shape {shapes}; {fix}" in msg, msg
    assert "truncated" not in msg  # not the wrong diagnosis
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # transformers' report and progress bar stay silent


def test_missing_or_extra_tensors_are_refused_not_random_initialised(tmp_path, capfd):
    """transformers loads a checkpoint lacking a tensor with that tensor random-initialised (and drops
    tensors beyond config.json) after a warning; kvlab refuses both, naming the tensor."""
    from safetensors.torch import load_file, save_file

    hf, directory = _saved_llama(tmp_path)
    weights = directory / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ConvertError) as e:
        from_hf(directory)
    assert str(e.value).endswith(
        "the weights lack model.layers.1.mlp.up_proj.weight, which config.json implies; the checkpoint is "
        "incomplete, or config.json describes a larger model: correct config.json (e.g. num_hidden_layers) "
        "or re-export the model"
    ), str(e.value)
    _, directory = _saved_llama(tmp_path, "deeper")
    _edit_config(directory, num_hidden_layers=1)  # the weights hold 2 layers
    capfd.readouterr()
    with pytest.raises(ConvertError) as e:
        from_hf(directory)
    msg = str(e.value)
    assert (
        "the weights hold model.layers.1.input_layernorm.weight (and 8 more), which config.json has no "
        in msg
    )
    assert "num_hidden_layers" in msg and "\n" not in msg
    assert capfd.readouterr().err == ""
    _edit_config(directory, num_hidden_layers=2)  # corrected: loads, and equals the HF model
    idx = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert_close(
            from_hf(directory)(idx),
            transformers.AutoModelForCausalLM.from_pretrained(directory)(idx).logits,
            **TIGHT,
        )


def test_import_leaves_hf_model_untouched():
    hf = _randomise(_llama())
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = from_hf(hf)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in before.items())


def test_model_config_round_trips_through_json():
    cfg = from_hf(_llama(rope_scaling=LLAMA3)).config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_untied_heads_survive_save_and_load(tmp_path, family):
    from kvlab.checkpoint import load_model, save_model

    model = _randomise(GPT(tiny_config("gqa", family=family)))
    assert model.lm_head.weight is not model.wte.weight
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert loaded.lm_head.weight is not loaded.wte.weight


def _saved_run(tmp_path, attention, family):
    from kvlab.checkpoint import save_model

    model = _randomise(GPT(tiny_config(attention, family=family, bias=family != "llama")))
    save_model(tmp_path / "run", model, extra={"train": {"max_iters": 1}})
    return model, tmp_path / "run"


def test_cli_export_hf_and_kvlab_formats(tmp_path, capsys):
    from kvlab.checkpoint import load_model
    from kvlab.cli import main

    model, run = _saved_run(tmp_path, "gqa", "llama")
    assert main(["export", str(run), "--format", "hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 1
    idx = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert_close(hf(idx).logits, model(idx), **TIGHT)
        # every command taking a run also takes hf:DIR and a plain HF directory
        assert_close(load_model(f"hf:{tmp_path / 'hf'}")(idx), model(idx), **TIGHT)
        assert_close(load_model(tmp_path / "hf")(idx), model(idx), **TIGHT)
    assert main(["export", f"hf:{tmp_path / 'hf'}", "--format", "kvlab", str(tmp_path / "kv")]) == 0
    with torch.no_grad():
        assert_close(load_model(tmp_path / "kv")(idx), model(idx), **TIGHT)


def test_cli_export_refuses_what_hf_cannot_express(tmp_path, capsys):
    from kvlab.cli import main

    _, run = _saved_run(tmp_path, "cla2", "llama")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cross-layer KV sharing" in err and "--format kvlab" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert main(["export", str(run), "--format", "kvlab", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_converted_mla_has_no_deepseek_counterpart_one_line():
    """to_mla's options (a RoPE key per KV head, chosen frequencies, a linear latent) are not DeepSeek's:
    exporting such a model is refused in one line naming the option, instead of a wrong or broken file."""
    from kvlab.convert.mla import mla_rank_bound, to_mla

    torch.manual_seed(0)
    model = from_hf(_randomise(_llama()))
    mla = to_mla(model, mla_rank_bound(model))
    with pytest.raises(ConvertError, match="one RoPE key shared by all heads") as e:
        to_hf(mla)
    assert "\n" not in str(e.value) and "--format kvlab" in str(e.value)
