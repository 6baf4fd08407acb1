"""Seed 000's harness: the four fills' metrics at the published shapes, the AST boundary, the substrate,
measured-vs-declared KV bytes, and the CLI commands init-attention / validate."""

from __future__ import annotations

import pytest
import torch

from kvlab import ModelConfig
from kvlab.cli import main
from kvlab.harness import SeedGPT, init_attention, load_attention, validate_file
from kvlab.harness.loader import AttentionLoadError
from kvlab.harness.metrics import compare, declared_metrics, diagnostics, measure_kv
from kvlab.harness.template import BEGIN_MARKER, END_MARKER, template_text

SHAPE_345M = dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=3, n_head=4, n_embd=32, block_size=32, vocab_size=64), **overrides})


@pytest.fixture(scope="module")
def fills(tmp_path_factory):
    d = tmp_path_factory.mktemp("fills")
    return {f: load_attention(init_attention(d / f"{f}.py", f)) for f in ("mha", "gqa", "mqa", "mla")}


def meta_model(loaded, cfg: ModelConfig, **extra) -> SeedGPT:
    with torch.device("meta"):  # the metrics are structural: no weights needed at 124M/345M
        return SeedGPT(cfg, loaded, **extra)


@pytest.mark.parametrize(
    "fill,shape,bytes_,sharing",
    [
        ("mha", "gpt2-124m", 3072, 1),
        ("gqa", "gpt2-124m", 768, 4),
        ("mqa", "gpt2-124m", 256, 12),
        ("mha", "345m", 4096, 1),
        ("gqa", "345m", 1024, 4),
        ("mqa", "345m", 256, 16),
    ],
)
def test_dense_fills_give_the_seed_figures(fills, fill, shape, bytes_, sharing):
    cfg = ModelConfig.preset("gpt2-124m") if shape == "gpt2-124m" else ModelConfig(**SHAPE_345M)
    m = declared_metrics(meta_model(fills[fill], cfg))
    assert (m["kv_bytes_per_token"], m["head_sharing_ratio"], m["latent_rank_ratio"]) == (
        bytes_,
        sharing,
        1.0,
    )
    assert m["kv_bytes_per_token_total"] == bytes_ * cfg.n_layer


def test_mla_fill_345m_and_124m_pilot(fills):
    model = meta_model(fills["mla"], ModelConfig(**SHAPE_345M))
    m = declared_metrics(model)
    assert (m["kv_bytes_per_token"], m["head_sharing_ratio"], m["latent_rank_ratio"]) == (192, 16, 0.25)
    attn = model.blocks[0].attn
    assert (attn.kv_lora_rank, attn.qk_rope_head_dim, attn.q_lora_rank, attn.softmax_scale) == (
        32,
        64,
        768,
        128**-0.5,
    )
    assert model.wpe is None  # use_pos_emb False: no learned positions
    pilot = declared_metrics(meta_model(fills["mla"], ModelConfig.preset("gpt2-124m"), kv_lora_rank=256))
    assert (pilot["kv_bytes_per_token"], pilot["head_sharing_ratio"], pilot["latent_rank_ratio"]) == (
        640,
        12,
        2.0,
    )


def test_substrate_is_nanogpt_around_the_file(fills):
    torch.manual_seed(0)
    model = SeedGPT(tiny(), fills["gqa"])
    assert model.lm_head.weight is model.wte.weight and model.wpe is not None
    assert model.blocks[1].attn.c_attn.out_features == 32 + 2 * 8  # q + K/V of one KV head (n_head // 4)
    std = model.blocks[0].attn.c_proj.weight.std().item()  # residual projection scaled by 1/sqrt(2 n_layer)
    assert abs(std - 0.02 / 6**0.5) < 0.003
    idx = torch.randint(0, 64, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 64)
    # causal: logits of the first 8 positions do not depend on later tokens
    other = idx.clone()
    other[:, 8:] = (other[:, 8:] + 1) % 64
    torch.testing.assert_close(model(other)[:, :8], logits[:, :8])
    diag = diagnostics(model)
    assert diag[0] == {
        "last_latent_rank_ratio": 1.0,
        "last_kv_storage_ratio": 0.25,
        "uses_latent_compression": False,
    }


@pytest.mark.parametrize("fill,expected", [("gqa", 32.0), ("mqa", 32.0), ("mla", 48.0)])
def test_measured_bytes_agree_with_declared(fills, fill, expected):
    # tiny: head_dim 8; gqa/mqa keep one 8-wide KV head (2*8*2 B); mla rank 16 + rope 8 -> 48 B
    model = SeedGPT(tiny(), fills[fill])
    declared, measured = declared_metrics(model), measure_kv(model)
    assert declared["kv_bytes_per_token"] == measured["kv_bytes_per_token"] == expected
    assert compare(declared, measured) == []


def test_mha_measured_is_bounded_by_the_input_width(fills):
    # K and V of MHA are linear in the LayerNorm'd 32-wide input (31 free dims with bias-free LN): a note
    model = SeedGPT(tiny(bias=False), fills["mha"])
    measured = measure_kv(model)
    assert [layer["kv_dims"] for layer in measured["per_layer"]] == [31, 31, 31]
    assert compare(declared_metrics(model), measured)[0].startswith("note layer 0: declared 128 B/token")


def _edit(tmp_path, fill, old, new, name="edited.py"):
    text = template_text(fill)
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


def test_a_file_that_understates_its_kv_is_flagged(tmp_path):
    # declares MQA (n_kv_head = 1) but computes and reads 4 full K/V heads
    path = _edit(
        tmp_path,
        "mha",
        "        self._uses_latent_compression = False\n",
        "        self._uses_latent_compression = False\n        self.n_kv_head = 1\n",
    )
    path.write_text(
        path.read_text().replace("view(B, T, self.n_kv_head, self.head_dim)", "view(B, T, -1, self.head_dim)")
    )
    model = SeedGPT(tiny(n_embd=64), load_attention(path))  # 4 heads x 16 wide
    declared, measured = declared_metrics(model), measure_kv(model)
    assert declared["kv_bytes_per_token"] == 64  # 2 * 1 * 16 * 2, the file's word
    assert measured["kv_bytes_per_token"] == 126  # 4 full K/V heads span 63 dims of the LayerNorm'd input
    assert compare(declared, measured)[0] == "MISMATCH layer 0: declared 64 B/token, measured 126 B/token"


def test_cross_layer_sharing_counts_zero_and_is_measured(tmp_path):
    path = _edit(tmp_path, "mla", "    return False\n", "    return layer_idx % 2 == 1\n")
    model = SeedGPT(tiny(n_layer=4), load_attention(path))
    declared = declared_metrics(model)
    assert [x["kv_bytes_per_token"] for x in declared["per_layer"]] == [48, 0, 48, 0]
    measured = measure_kv(model)
    assert [x["kv_bytes_per_token"] for x in measured["per_layer"]] == [48, 0, 48, 0]
    loss = model(torch.randint(0, 64, (2, 16))).logsumexp(-1).mean()
    loss.backward()  # the borrowed latent is detached: layer 1 trains its own up-projection only
    assert model.blocks[1].attn.kv_b_proj.weight.grad is not None


def test_substrate_needs_the_gpt2_family(fills):
    with pytest.raises(AttentionLoadError, match="family='llama' does not apply"):
        meta_model(fills["mha"], ModelConfig.preset("smollm2-135m"))


def test_seed_file_region_runs_unchanged(tmp_path):
    # a seed-style script: other code around the region is ignored; only the region is run
    text = template_text("gqa").replace("import math", "import math\nimport os\nprint('not run')")
    path = tmp_path / "custom_pretrain.py"
    path.write_text(text + "\nos.system('echo nor this')\n")
    assert validate_file(path) == []
    m = declared_metrics(SeedGPT(tiny(), load_attention(path)))
    assert m["kv_bytes_per_token"] == 32


HOSTILE_SNIPPETS = {
    "import": ("    import os\n", "import"),
    "eval": ("    eval('1')\n", "forbidden-builtin"),
    "open": ("    open('/tmp/x', 'w')\n", "forbidden-builtin"),
    "globals": ("    globals()\n", "forbidden-builtin"),
    "os attr": ("    torch.serialization.os.system('id')\n", "forbidden-name"),
    "subprocess": ("    subprocess.run(['id'])\n", "forbidden-name"),
    "dunder": ("    ().__class__.__bases__[0].__subclasses__()\n", "dunder-attribute"),
    "getattr dunder": ("    getattr(config, '__class__')\n", "dunder-attribute"),
    "getattr dynamic": ("    getattr(torch, 'o' + 's')\n", "dynamic-attribute"),
    "frame": ("    (i for i in []).gi_frame.f_globals\n", "frame-attribute"),
}


@pytest.mark.parametrize("case", HOSTILE_SNIPPETS)
def test_validator_rejects_what_reaches_outside(tmp_path, case):
    snippet, rule = HOSTILE_SNIPPETS[case]
    path = _edit(tmp_path, "mha", "    return False\n", snippet + "    return False\n")
    violations = validate_file(path)
    assert rule in {v.rule for v in violations}
    with pytest.raises(AttentionLoadError, match="fails validation"):
        load_attention(path)


def test_validator_reports_every_violation_with_positions(tmp_path, capsys):
    region = (
        "X = open('f')\n"
        "def build_kv_heads(config, n=len([1])):\n    return 1, 8\n"
        "@torch.no_grad()\ndef cross_layer_share(layer_idx, config):\n    return False\n"
        "class CausalSelfAttention(nn.Module, metaclass=type):\n    pass\n"
    )
    path = tmp_path / "bad.py"
    path.write_text(f"import torch\n{BEGIN_MARKER}\n{region}{END_MARKER}\n")
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}:3:1 missing-definition: the region must define function latent_kv_project",
        f"{path}:3:1 top-level-statement: only def and class may appear at the top level of the region "
        "(found Assign)",
        f"{path}:3:5 forbidden-builtin: 'open' is not allowed in the region",
        f"{path}:4:30 default-argument: default arguments must be literals (they run at definition time)",
        f"{path}:6:2 decorator: decorators run code at definition time; only classmethod, property, "
        "staticmethod are allowed",
        f"{path}:9:38 class-keyword: class keyword metaclass= (e.g. a metaclass) is not allowed",
    ]


def test_cli_init_attention_and_validate(tmp_path, capsys):
    path = tmp_path / "a.py"
    for fill in ("mha", "gqa", "mqa", "mla"):
        assert main(["init-attention", str(path), "--from", fill, "--force"]) == 0
        assert main(["validate", str(path)]) == 0
        assert capsys.readouterr().out.endswith(f"{path}: OK (the region passes the boundary)\n")
    assert main(["init-attention", str(path)]) == 2  # exists: one clear error line
    assert "exists; pick another name or pass --force" in capsys.readouterr().err
    (tmp_path / "nomarkers.py").write_text("def f():\n    pass\n")
    assert main(["validate", str(tmp_path / "nomarkers.py")]) == 1
    assert "region-markers" in capsys.readouterr().out
