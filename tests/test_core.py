"""Core: presets and KV metrics, configuration errors, the cache's guards, checkpoints, generation, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kvlab import GPT, AttentionConfig, CacheError, ConfigError, ModelConfig
from kvlab.checkpoint import CheckpointError, load_model, save_model
from kvlab.cli import main
from kvlab.config import parse_kv_share
from kvlab.generate import generate

from conftest import tiny_config


def _meta_model(preset: str, **kw) -> GPT:
    with torch.device("meta"):
        return GPT(ModelConfig.preset(preset, **kw))


@pytest.mark.parametrize(
    "attention, per_layer, head_ratio, layer_ratio",
    [
        ("mha", 3072, 1, 1),
        ("gqa", 768, 4, 1),
        ("mqa", 256, 12, 1),
        ("cla2", 1536, 1, 2),
        (AttentionConfig(kind="gqa", n_kv_heads=3, kv_share="every:2"), 384, 4, 2),
        ("mlkv-6", 256 / 2, 12, 2),
    ],
)
def test_gpt2_124m_kv_metrics(attention, per_layer, head_ratio, layer_ratio):
    m = _meta_model("gpt2-124m", attention=attention).kv_metrics()
    assert m["kv_bytes_per_token"] == per_layer
    assert m["kv_bytes_per_token_total"] == per_layer * 12
    assert m["head_sharing_ratio"] == head_ratio
    assert m["layer_sharing_ratio"] == layer_ratio
    assert m["latent_rank_ratio"] == 1.0


def test_gpt2_124m_shape_and_params():
    model = _meta_model("gpt2-124m", attention="mha")
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (12, 12, 768)
    assert model.kv_metrics()["kv_bytes_per_token_total"] == 36864
    # nanoGPT's GPT-2 small with the padded 50304 vocabulary: 123.59M non-embedding-position parameters
    assert model.num_params() == 123_587_328
    assert _meta_model("gpt2-345m").config.n_layer == 24


def test_preset_overrides_and_json_round_trip():
    cfg = ModelConfig.preset("cpu-tiny", attention="gqa", n_layer=2, dropout=0.1)
    assert cfg.n_layer == 2 and cfg.attention.n_kv_heads == cfg.n_head // 4
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    layered = tiny_config(AttentionConfig(kind="gqa", layers={1: AttentionConfig(kind="gqa", n_kv_heads=1)}))
    assert ModelConfig.from_dict(json.loads(json.dumps(layered.to_dict()))) == layered


@pytest.mark.parametrize(
    "spec, owners",
    [
        ("none", [0, 1, 2, 3, 4, 5]),
        ("every:2", [0, 0, 2, 2, 4, 4]),
        ("every:3", [0, 0, 0, 3, 3, 3]),
        ("groups:3", [0, 0, 2, 2, 4, 4]),
        ("groups:4", [0, 1, 1, 3, 4, 4]),
        ("groups:1", [0] * 6),
        ([0, 0, 0, 3, 3, 0], [0, 0, 0, 3, 3, 0]),
    ],
)
def test_kv_share_owner_maps(spec, owners):
    assert parse_kv_share(spec, 6) == owners


def test_mlkv_owner_spacing_matches_seed_002():
    # 12 layers, 6 owners: layers 0, 2, 4, 6, 8, 10 (MLKV's [0] + [int((i+1) * L / n)])
    assert sorted(set(parse_kv_share("groups:6", 12))) == [0, 2, 4, 6, 8, 10]
    assert sorted(set(parse_kv_share("groups:4", 12))) == [0, 3, 6, 9]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: tiny_config(AttentionConfig(n_kv_heads=3)),
            "n_kv_heads=3 must divide n_head=4; try 1, 2 or 4",
        ),
        (lambda: tiny_config(AttentionConfig(kv_share=[0, 2, 2, 3])), "kv_share[1]=2"),
        (lambda: tiny_config(AttentionConfig(kv_share=[0, 0, 1, 3])), "layer 1 itself borrows from 0"),
        (lambda: tiny_config(AttentionConfig(kv_share="pairs")), "kv_share='pairs' not understood"),
        (lambda: tiny_config(AttentionConfig(kv_share="every:9")), "between 1 and n_layer=4"),
        (lambda: tiny_config(AttentionConfig(kind="flash")), "unknown attention kind 'flash'"),
        (lambda: tiny_config("gqa-ish"), "unknown attention preset 'gqa-ish'"),
        (lambda: ModelConfig.preset("gpt5"), "unknown model preset 'gpt5'"),
        (lambda: tiny_config("mha", n_embd=30), "n_embd=30 must be divisible by n_head=4"),
        (lambda: tiny_config(AttentionConfig(kv_rank=8)), "kv_rank is not an option of attention kind='gqa'"),
        (
            lambda: tiny_config(
                AttentionConfig(kv_share="every:2", layers={1: AttentionConfig(n_kv_heads=1)})
            ),
            "layer 1 borrows KV from layer 0 but their attention structures differ",
        ),
        (lambda: tiny_config(AttentionConfig(layers={7: AttentionConfig()})), "valid layers are 0..3"),
        (lambda: ModelConfig.from_dict({"n_layers": 2}), "unknown model field(s) ['n_layers']"),
    ],
)
def test_config_errors_are_one_line_and_name_the_fix(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@torch.inference_mode()
def test_cache_guards():
    model = GPT(tiny_config("gqa")).eval()
    cache = model.new_cache(batch_size=2, max_len=10)
    model(torch.zeros(2, 8, dtype=torch.long), cache=cache)
    with pytest.raises(CacheError, match="8 cached \\+ 3 new tokens exceed the cache's max_len=10"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    assert cache.pos == 8  # a refused call changes nothing
    with pytest.raises(CacheError, match="batch size 1 does not match"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(CacheError, match="exceeds block_size=64"):
        model.new_cache(batch_size=1, max_len=65)
    with pytest.raises(CacheError, match="exceed block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache.reset()
    full = model(torch.arange(10)[None].repeat(2, 1))
    torch.testing.assert_close(model(torch.arange(10)[None].repeat(2, 1), cache=cache), full)


def test_borrowing_layers_have_no_kv_projection():
    model = GPT(tiny_config(AttentionConfig(kv_share="every:2")))
    assert [b.attn.kv_proj is not None for b in model.blocks] == [True, False, True, False]
    assert model.kv_metrics()["layer_sharing_ratio"] == 2.0


def test_checkpoint_round_trip(tmp_path):
    model = GPT(tiny_config(AttentionConfig(n_kv_heads=2, kv_share="every:2"))).eval()
    save_model(tmp_path, model, extra={"note": "test"})
    loaded = load_model(tmp_path)
    idx = torch.randint(0, 97, (2, 11))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["note"] == "test" and cfg["model"]["attention"]["kv_share"] == "every:2"
    assert "torch" in cfg["environment"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path)
    model = GPT(tiny_config("mha"))
    save_model(tmp_path, model)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)
    save_model(tmp_path, GPT(tiny_config("mqa")))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["attention"]["n_kv_heads"] = 4  # config no longer matches the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path)


@torch.inference_mode()
def test_generate_sampling_eos_and_speed():
    model = GPT(tiny_config("gqa")).eval()
    prompt = torch.randint(0, 97, (2, 5))
    a = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=7)
    b = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=7)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (2, 15)
    assert torch.equal(a.tokens[:, :5], prompt)
    assert a.tokens_per_s > 0 and a.cache_bytes == model.kv_cache_bytes(2, 15)
    greedy = generate(model, prompt[:1], 10).tokens
    eos = int(greedy[0, 7])  # the third generated token: generation must stop right there
    stopped = generate(model, prompt[:1], 10, eos_token=eos).tokens
    first = (greedy[0, 5:] == eos).nonzero()[0].item()
    assert torch.equal(stopped[0], greedy[0, : 5 + first + 1])
    with pytest.raises(CacheError, match="exceeds the model's block_size=64"):
        generate(model, prompt, 60)


@torch.inference_mode()
def test_ragged_generate_eos_padding_and_throughput():
    """A row that hits EOS ends there (then pad = EOS); the others keep generating; tokens/s counts only
    the tokens decode steps produced."""
    model = GPT(tiny_config("gqa")).eval()
    short, long_ = torch.randint(0, 97, (4,)), torch.randint(0, 97, (9,))
    greedy = generate(model, [short, long_], 8)
    alone = [generate(model, p[None], 8).tokens[0].tolist() for p in (short, long_)]
    assert greedy.sequences() == alone and greedy.new_tokens == 8
    eos = alone[0][4 + 2]  # the short row's third generated token
    stopped = generate(model, [short, long_], 8, eos_token=eos)
    cut = [row[: n + 1 + row[n:].index(eos)] if eos in row[n:] else row for row, n in zip(alone, (4, 9))]
    assert stopped.sequences() == cut
    assert stopped.lengths == [len(r) for r in cut]
    width = stopped.tokens.shape[1]
    assert stopped.tokens[0, len(cut[0]) :].tolist() == [eos] * (width - len(cut[0]))
    # the short row's tokens 2.. came from decode steps, the long row's every token after its prompt
    assert stopped.decoded_tokens == (len(cut[0]) - 5) + (len(cut[1]) - 9)
    same = generate(model, [short[:3], long_[:3]], 5)  # equal lengths as a list == as a tensor
    assert torch.equal(same.tokens, generate(model, torch.stack([short[:3], long_[:3]]), 5).tokens)


@torch.inference_mode()
def test_short_generations_skip_the_weight_copies(monkeypatch):
    """The Decoder's (in, out) weight copies pay for themselves only over enough steps: generate asks for
    them (relayout=None: the device's default) from RELAYOUT_MIN_STEPS decode steps on, not below."""
    import kvlab.generate as gen

    asked = []

    class Recording(gen.Decoder):
        def __init__(self, model, relayout=None, compile=False, static=False):
            asked.append(relayout)
            super().__init__(model, relayout=relayout, compile=compile, static=static)

    monkeypatch.setattr(gen, "Decoder", Recording)
    model = GPT(tiny_config("gqa")).eval()
    prompt = torch.randint(0, 97, (1, 5))
    short = generate(model, prompt, 4).tokens
    long_ = generate(model, prompt, gen.RELAYOUT_MIN_STEPS + 1).tokens
    generate(model, [prompt[0], torch.randint(0, 97, (30,))], 4)  # 25 tail steps + 3: copies made
    assert asked == [False, None, None]
    assert torch.equal(long_[:, :9], short)  # the same tokens either way


def test_cli_generate_and_one_line_errors(tmp_path, capsys):
    model = GPT(tiny_config("mqa")).eval()
    save_model(tmp_path, model)
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    expected = generate(model, torch.tensor([[1, 2, 3]]), 4).tokens[0, 3:].tolist()
    assert out.splitlines()[0] == ",".join(map(str, expected))
    assert (
        main(["generate", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--static"]) == 0
    )
    assert capsys.readouterr().out.splitlines()[0] == ",".join(map(str, expected))  # the static step's tokens
    argv = ["generate", str(tmp_path), "--prompt-ids", "1,2,3", "--prompt-ids", "4", "--max-new-tokens", "4"]
    assert main(argv) == 0  # a batch of two prompts of different lengths
    lines = capsys.readouterr().out.splitlines()
    rows = generate(model, [[1, 2, 3], [4]], 4).sequences()
    ids = [",".join(map(str, rows[0][3:])), ",".join(map(str, rows[1][1:]))]
    assert lines[:4] == ["--- [0]", ids[0], "--- [1]", ids[1]]
    assert rows[0][3:] == expected and "batch 2" in lines[4]
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,2,500"]) == 2
    assert "outside the model's vocabulary (97 tokens)" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt-ids", ",".join(["1"] * 70)]) == 2
    assert "exceeds the model's block_size=64" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_subprocess_error_has_no_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "kvlab.cli", "info", "--attention", "gqa", "mlkv-99"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "kvlab: error: kv_share='groups:99': N must be between 1 and n_layer=12"
    ]
    assert "Traceback" not in r.stderr


def test_attention_options_belong_to_their_kind_and_old_configs_load():
    """Each kind owns its options; configs written by kvlab 0.1 (every kind's field, unused ones null)
    still load, while a set option of another kind is refused with one line."""
    legacy = {
        "kind": "gqa", "n_kv_heads": 2, "kv_share": "every:2", "kv_rank": None, "rope_dim": None,
        "q_rank": None, "rope_theta": 10000.0, "ranks": None, "k_ranks": None, "v_ranks": None,
        "interval": None, "max_contexts": None, "local_window": None, "context_dim": None, "layers": {},
    }  # fmt: skip
    att = AttentionConfig.from_dict(legacy)
    assert att == AttentionConfig(kind="gqa", n_kv_heads=2, kv_share="every:2")
    assert att.to_dict() == {"kind": "gqa", "n_kv_heads": 2, "kv_share": "every:2", "layers": {}}
    assert AttentionConfig.from_dict(att.to_dict()) == att
    with pytest.raises(ConfigError, match="kv_rank is not an option of attention kind='gqa'"):
        AttentionConfig.from_dict({**legacy, "kv_rank": 8})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        AttentionConfig.from_dict("hello")
    mla = AttentionConfig(kind="mla", kv_rank=8, rope_dim=4)
    assert mla.replace(kv_rank=16).kv_rank == 16 and mla.kv_rank == 8
    assert mla.replace(kind="gqa") == AttentionConfig(kind="gqa")  # a new kind starts from its defaults
    with pytest.raises(AttributeError):
        mla.n_kv_heads  # noqa: B018


def test_model_families_resolve_their_defaults():
    llama = ModelConfig.preset("smollm2-135m")
    assert (llama.norm, llama.activation, llama.gated_mlp, llama.positions) == (
        "rmsnorm",
        "silu",
        True,
        "rope",
    )
    assert llama.tie_embeddings and llama.rope_theta == 100000.0 and llama.attention.n_kv_heads == 3
    pythia = ModelConfig.preset("pythia-70m")
    assert pythia.parallel_residual and pythia.rope_dim == 16 and not pythia.tie_embeddings  # 25% of 64
    assert ModelConfig.from_dict(pythia.to_dict()) == pythia
    with torch.device("meta"):
        assert GPT(pythia).wpe is None and GPT(ModelConfig.preset("gpt2-124m")).wpe is not None
    for bad, match in (
        (dict(family="opt"), "family='opt' unknown"),
        (dict(family="neox", rotary_pct=0.01), "RoPE needs a positive even number"),
        (dict(family="llama", rope_scaling={"rope_type": "yarn", "factor": 4}), "rope_type"),
        (dict(bias="yes"), "bias='yes' must be true or false"),
    ):
        with pytest.raises(ConfigError, match=match):
            ModelConfig(**bad)


def test_environment_records_a_commit_hash_or_none(monkeypatch):
    """A repository without commits makes `git rev-parse HEAD` print the word HEAD: record None, not it.
    The commit is the one the process started at: a later commit does not change what it records."""
    import subprocess

    from kvlab import checkpoint
    from kvlab.checkpoint import environment_info

    env = environment_info()
    head = env["git_commit"]
    assert head is None or (len(head) == 40 and int(head, 16) >= 0)
    assert (env["git_dirty"] is None) == (head is None)
    fake = subprocess.CompletedProcess([], 128, stdout="HEAD\n", stderr="fatal: ambiguous argument 'HEAD'")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: fake)
    assert checkpoint._git_commit() == (None, None)
    monkeypatch.setenv("KVLAB_GIT_COMMIT", "A" * 40)  # a copy of the tree without .git names its commit
    assert checkpoint._git_commit() == ("a" * 40, None)
    monkeypatch.setenv("KVLAB_GIT_COMMIT", "HEAD")
    assert checkpoint._git_commit() == (None, None)
    assert environment_info()["git_commit"] == head  # read when kvlab loaded, not now
    moved = subprocess.CompletedProcess([], 0, stdout="f" * 40 + "\n", stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: moved)
    assert checkpoint._git_commit() == ("f" * 40, True)


def test_a_cache_of_another_structure_is_one_line():
    gqa, mqa = (
        GPT(ModelConfig.preset("cpu-tiny", attention="gqa")),
        GPT(ModelConfig.preset("cpu-tiny", attention="mqa")),
    )
    cache = mqa.new_cache(batch_size=1, max_len=8)
    with pytest.raises(CacheError, match="another shape or attention structure"):
        gqa(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    assert cache.pos == 0
    mqa(torch.zeros(1, 4, dtype=torch.long), cache=cache)  # its own model uses it
    assert cache.pos == 4
    meta_cache = mqa.new_cache(batch_size=1, max_len=8, device="meta")
    with pytest.raises(CacheError, match="the cache lives on meta but the input is on cpu"):
        mqa(torch.zeros(1, 4, dtype=torch.long), cache=meta_cache)
