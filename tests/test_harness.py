"""Seed 000's harness: the four fills' metrics at the published shapes, the AST boundary, the substrate,
measured-vs-declared KV bytes, and the CLI commands init-attention / validate."""

from __future__ import annotations

import pytest
import torch

from kvlab import ModelConfig
from kvlab.cache import CacheError
from kvlab.cli import main
from kvlab.generate import generate
from kvlab.harness import SeedGPT, init_attention, load_attention, validate_file
from kvlab.harness.cached import cache_report, check_cache, compare_cache, usable
from kvlab.harness.loader import AttentionLoadError
from kvlab.harness.metrics import compare, declared_metrics, diagnostics, measure_kv
from kvlab.harness.template import BEGIN_MARKER, END_MARKER, template_text

FORWARD_LINE = "    def forward(self, x, state=None, pos=0):\n"
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


# class bodies run when the class is defined; the region may not patch the modules every model shares
DEFINITION_TIME = {
    "call in class body": (
        "    torch.save(torch.zeros(1), 'x.pt')\n",
        "class-body-statement",
        "found a call, torch.save(...)",
    ),
    "patch in class body": (
        "    F.scaled_dot_product_attention = None\n",
        "class-body-statement",
        "found an assignment to F.scaled_dot_product_attention",
    ),
    "computed class attribute": ("    width = len([1, 2])\n", "class-body-statement", "width = len([1, 2])"),
    "if in class body": ("    if True:\n        pass\n", "class-body-statement", "found If statement"),
}
MONKEYPATCHES = {
    "F attribute": "        F.scaled_dot_product_attention = None\n",
    "deep attribute": "        torch.nn.functional.softmax = lambda x, dim=-1: x\n",
    "augmented": "        torch.backends.cuda.matmul.allow_tf32 |= True\n",
    "unpacked": "        F.gelu, n = None, 1\n",
    "subscript": "        math.__doc__ = None\n        nn.modules[0] = None\n",
    "del": "        del math.pi\n",
    "for target": "        for F.relu in [None]:\n            pass\n",
    "comprehension target": "        y = [0 for torch.zeros in [None]]\n",
    "setattr": "        setattr(F, 'softmax', None)\n",
    "delattr": "        delattr(torch.nn, 'Linear')\n",
}
ALIASES = {
    "bare module": ("        g = F\n        g.softmax = None\n", "F may only be used as F.NAME"),
    "module argument": ("        self.patch(torch)\n", "torch may only be used as torch.NAME"),
    "submodule value": (
        "        g = torch.nn.functional\n",
        "torch.nn.functional may only be used as torch.nn.functional.NAME",
    ),
}


@pytest.mark.parametrize("case", DEFINITION_TIME)
def test_class_bodies_hold_only_definitions(tmp_path, case):
    snippet, rule, found = DEFINITION_TIME[case]
    anchor = "    def __init__(self, config, layer_idx=0):\n"
    path = _edit(tmp_path, "gqa", anchor, snippet + anchor)
    lines = path.read_text().splitlines()
    line = lines.index(snippet.splitlines()[0]) + 1
    hits = [v for v in validate_file(path) if v.rule == rule]
    assert [(v.line, v.col) for v in hits] == [(line, 5)]
    assert found in hits[0].message and "only def, a docstring and NAME = literal" in hits[0].message
    with pytest.raises(AttentionLoadError, match="fails validation"):
        load_attention(path)  # never defined, so torch.save never ran
    assert not (tmp_path / "x.pt").exists()


def test_class_body_literals_and_docstrings_pass(tmp_path):
    anchor = "    def __init__(self, config, layer_idx=0):\n"
    body = '    """A docstring."""\n    table = {"a": (1, -2.5), "b": [None, "x"]}\n    flag = True\n'
    head = "class CausalSelfAttention(nn.Module):\n"
    path = _edit(tmp_path, "mha", head, head + body + "    pass\n")
    assert anchor in path.read_text() and validate_file(path) == []


@pytest.mark.parametrize("case", MONKEYPATCHES)
def test_monkeypatching_the_region_modules_is_rejected(tmp_path, case):
    snippet = MONKEYPATCHES[case]
    path = _edit(tmp_path, "mha", FORWARD_LINE, FORWARD_LINE + snippet)
    first = path.read_text().splitlines().index(snippet.splitlines()[0]) + 1
    hits = [v for v in validate_file(path) if v.rule == "monkeypatch"]
    assert hits and {v.line for v in hits} <= {first, first + 1}, hits
    assert "for every model in the process" in hits[0].message


@pytest.mark.parametrize("case", ALIASES)
def test_region_modules_cannot_be_aliased(tmp_path, case):
    snippet, message = ALIASES[case]
    path = _edit(tmp_path, "mha", FORWARD_LINE, FORWARD_LINE + snippet)
    hits = [v for v in validate_file(path) if v.rule == "module-alias"]
    assert len(hits) == 1 and hits[0].message.startswith(message)


def test_attribute_reads_and_self_state_still_pass(tmp_path):
    # reading module attributes, chains that end in a function or dtype, and state on self are fine
    body = (
        "        self.scale = math.pi\n"
        "        dt = torch.float32\n"
        "        sdpa = torch.nn.functional.scaled_dot_product_attention\n"
        "        self.cache_table = {}\n"
        "        self.cache_table[0] = dt\n"
    )
    path = _edit(tmp_path, "mha", FORWARD_LINE, FORWARD_LINE + body)
    assert validate_file(path) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file; create one with `kvlab init-attention"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is a binary file (it holds NUL bytes), not Python source"),
        ("# caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 5: b'\\xe9'); save it as UTF-8"),
        ("dir", "is a directory, not an attention file"),
    ],
)
def test_validate_unreadable_file_is_a_usage_error(tmp_path, capsys, content, message):
    path = tmp_path / "attn.py"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"kvlab: error: {path}") and message in err


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


# ---- kvlab's cache interface in attention files -------------------------------------------------------
NEW_STATE = "    def new_state(self, batch_size, max_len, device, dtype):\n"
CACHED_WRITE = (
    "            if state is not None:  # append the new tokens' K/V, then read every cached position\n"
    '                state["k"][:, :, pos : pos + T] = k\n'
    '                state["v"][:, :, pos : pos + T] = v\n'
    '                k = state["k"][:, :, : pos + T].to(q.dtype)  # (B, n_kv, S = pos + T, hd)\n'
    '                v = state["v"][:, :, : pos + T].to(q.dtype)  # (B, n_kv, S, hd)\n'
)


@pytest.mark.parametrize(
    "fill,share,per_layer",
    [
        ("mha", False, [128, 128, 128]),  # 2 * 4 heads * 8 * 2 B
        ("gqa", False, [32, 32, 32]),  # one KV head
        ("mqa", False, [32, 32, 32]),
        ("mla", False, [48, 48, 48]),  # (rank 16 + rope 8) * 2 B
        ("gqa", True, [32, 0, 32, 0]),  # odd layers reuse the previous layer's K/V: they keep nothing
        ("mla", True, [48, 0, 48, 0]),
    ],
)
def test_fills_cache_decodes_as_the_full_forward(tmp_path, fill, share, per_layer):
    path = _edit(tmp_path, fill, "    return False\n", "    return layer_idx % 2 == 1\n") if share else None
    loaded = load_attention(path) if share else load_attention(init_attention(tmp_path / "f.py", fill))
    model = SeedGPT(tiny(n_layer=len(per_layer)), loaded)
    assert model.supports_cache
    report = check_cache(model, prompt_len=8, new_tokens=4, batch_size=2)
    assert report["decode_matches_full"] and report["max_abs_diff"] < 1e-10
    assert [x["kv_bytes_per_token"] for x in report["per_layer"]] == per_layer
    declared = declared_metrics(model)
    assert [x["kv_bytes_per_token"] for x in declared["per_layer"]] == per_layer
    assert compare_cache(declared, report) == []
    # the cache's own nbytes: 2 sequences x 12 tokens x numbers per token x 8 bytes (float64)
    assert report["cache_nbytes"] == 2 * 12 * sum(per_layer) // 2 * 8


@pytest.mark.parametrize("fill", ["gqa", "mla"])
def test_kvlab_generate_drives_the_files_cache(fills, fill):
    # kvlab's generate (prefill + one token a step through new_cache) == greedy over full forwards
    torch.manual_seed(0)
    model = SeedGPT(tiny(), fills[fill]).eval()
    idx = torch.randint(0, 64, (2, 6))
    result = generate(model, idx, 10)
    seq = idx
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(result.tokens, seq)
    per_token = {"gqa": 2 * 8, "mla": 16 + 8}[fill]  # numbers per token and layer
    assert result.cache_bytes == 2 * 16 * 3 * per_token * 4  # batch 2, 16 tokens, 3 layers, float32
    cache = model.new_cache(batch_size=2, max_len=16)
    model(idx, cache=cache)
    with pytest.raises(CacheError, match="exceed the cache's max_len=16"):
        model(torch.zeros(2, 11, dtype=torch.long), cache=cache)


def test_a_file_without_the_interface_is_the_seeds_contract(tmp_path, fills):
    # the seed's own shape: forward(x) only, no new_state -> cache-free, with the reason recorded
    text = template_text("gqa")
    start, end = text.index(NEW_STATE), text.index("    def forward(self, x, state=None, pos=0):\n")
    text = text[:start] + text[end:].replace(
        "def forward(self, x, state=None, pos=0):", "def forward(self, x):"
    )
    path = tmp_path / "seed_style.py"
    path.write_text(text.replace(CACHED_WRITE, ""))
    assert validate_file(path) == []
    model = SeedGPT(tiny(), load_attention(path))
    assert not model.supports_cache
    assert cache_report(model) == {
        "interface": False,
        "reason": "CausalSelfAttention defines no new_state(batch_size, max_len, device, dtype)",
    }
    with pytest.raises(CacheError, match="no cache: CausalSelfAttention defines no new_state"):
        model.new_cache(batch_size=1, max_len=8)
    torch.manual_seed(0)
    reference = SeedGPT(tiny(), fills["gqa"])
    model.load_state_dict(reference.state_dict())  # same weights: the same seed-000 forward
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx), reference(idx))


SMUGGLERS = {
    # K/V kept on the module, the last call's: caught by decoding two sequences interleaved
    "last call": (
        "            if state is not None:\n"
        "                if pos == 0:\n"
        "                    self.hist = (k, v)\n"
        "                else:\n"
        "                    self.hist = (torch.cat([self.hist[0], k], 2), torch.cat([self.hist[1], v], 2))\n"
        "                k, v = self.hist\n"
    ),
    # K/V kept on the module, keyed by the cache: caught by decoding from a copy of the cache
    "by cache": (
        "            if state is not None:\n"
        "                old = self.hist.get(id(state))\n"
        "                if old is not None:\n"
        "                    k, v = torch.cat([old[0], k], 2), torch.cat([old[1], v], 2)\n"
        "                self.hist[id(state)] = (k, v)\n"
    ),
}


@pytest.mark.parametrize("case", SMUGGLERS)
def test_state_kept_outside_the_cache_is_caught(tmp_path, case):
    path = _edit(tmp_path, "gqa", CACHED_WRITE, SMUGGLERS[case])
    init = "        self._uses_latent_compression = False\n"
    text = path.read_text().replace(init, init + "        self.hist = {}\n")
    path.write_text(
        text.replace(
            '        return {\n            "k"', '        return {}\n        return {\n            "k"'
        )
    )
    assert validate_file(path) == []
    model = SeedGPT(tiny(), load_attention(path))
    report = cache_report(model)
    assert report["interface"] and not report["decode_matches_full"] and not usable(report)
    flags = compare_cache(declared_metrics(model), report)
    assert flags[0].startswith("MISMATCH cache: cached decoding differs from the full forward")
    assert flags[1:] == [
        f"note layer {i}: declared 32 B/token, the cache holds only 0 B/token" for i in range(3)
    ]


def test_a_cache_larger_than_declared_is_flagged(tmp_path):
    # declares one KV head (gqa) but allocates a cache for all four heads, writing one of them
    path = _edit(
        tmp_path,
        "gqa",
        "        shape = (batch_size, self.n_kv_head, max_len, self.head_dim)",
        "        shape = (batch_size, self.n_head, max_len, self.head_dim)",
    )
    path.write_text(
        path.read_text()
        .replace('state["k"][:, :, pos', 'state["k"][:, :1, pos')
        .replace('state["v"][:, :, pos : pos + T] = v', 'state["v"][:, :1, pos : pos + T] = v')
        .replace('state["k"][:, :, : pos', 'state["k"][:, :1, : pos')
        .replace('state["v"][:, :, : pos', 'state["v"][:, :1, : pos')
    )
    model = SeedGPT(tiny(), load_attention(path))
    report = cache_report(model)
    assert report["decode_matches_full"]
    assert compare_cache(declared_metrics(model), report) == [
        f"MISMATCH layer {i}: declared 32 B/token, the cache holds 128 B/token" for i in range(3)
    ]


def test_a_cached_path_that_raises_is_reported_not_fatal(tmp_path):
    path = _edit(
        tmp_path, "mqa", CACHED_WRITE, "            if state is not None:\n                k = k[9]\n"
    )
    model = SeedGPT(tiny(), load_attention(path))
    report = cache_report(model)
    assert report["error"].startswith("the cached path failed (IndexError: index 9 is out of bounds")
    assert not usable(report)
    assert compare_cache(declared_metrics(model), report) == [f"MISMATCH cache: {report['error']}"]
