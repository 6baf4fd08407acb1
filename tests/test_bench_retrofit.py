"""Bench suites that start from a pretrained [source]: parsing and its errors, the plan (recipe settings,
KV bytes from the real converters), and a real retrofit bench end to end on a tiny trained source: every
method scored at step 0 and after uptraining by the same evaluation, the control among them, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kvlab.bench import SuiteError, load_suite, parse_suite, plan_cells, run_bench
from kvlab.bench.methods import Retrofit
from kvlab.bench.plan import format_plan, method_kv_table
from kvlab.checkpoint import load_model
from kvlab.config import ModelConfig, TrainConfig
from kvlab.eval import evaluate
from kvlab.retrofit.structures import convert
from kvlab.train import train

RETRO_TOML = """
[suite]
name = "retro"
seeds = 1
seed = 3

[source]
from = "SOURCE"
calibration = 1

[model]
block_size = 32

[data]
corpus = "CORPUS"
tokenizer = "bpe-300"

[train]
max_iters = 16
batch_size = 4
grad_accum = 1
eval_interval = 16
eval_iters = 2

[eval]
limit = 6
word_perplexity = false
speed = false

[methods]
control = "none"
mqa = "mqa"
mla = "mla:24:4"
matryoshka-half = { to = "matryoshka+search:0.5:0.5", recipe = "distill" }
matryoshka-after = { to = "matryoshka+search:0.5:0.5", recipe = "distill", search_after = true }
context-l0 = { to = "context:0", recipe = "oacd", phase1_iters = 4 }

[regimes.train]
heldout = "heldout"
"""


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A Llama-family MHA model (RoPE, 4 heads of 8) briefly trained on a prepared word corpus."""
    from kvlab.data import prepare

    root = tmp_path_factory.mktemp("retro")
    rng = random.Random(0)
    words = "the king queen crown sword castle river night day love war peace bread wine said went".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(500)))
    data = prepare(corpus, "bpe-300", root=root / "data")
    cfg = ModelConfig(
        family="llama", n_layer=2, n_head=4, n_embd=32, intermediate_size=48, block_size=32,
        vocab_size=320, attention="mha",
    )  # fmt: skip
    tcfg = TrainConfig(max_iters=30, eval_interval=30, eval_iters=2, batch_size=8, lr=3e-3, device="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(cfg, tcfg, data, root / "src", progress=False)
    finally:
        torch.set_num_threads(before)
    return run, corpus, root


def _suite(tiny_source, text: str = RETRO_TOML):
    run, corpus, _ = tiny_source
    return parse_suite(_toml(text.replace("SOURCE", str(run)).replace("CORPUS", str(corpus))), "retro.toml")


def test_builtin_smollm2_retrofit_suite_plans_without_fetching(capsys):
    """The shipped study parses and dry-runs from the preset of the same name (nothing fetched): every
    reduced structure at about half of SmolLM2's 768 bytes or less, the recipes' own settings."""
    suite = load_suite("smollm2-retrofit")
    assert suite.pretrained == {"from": "smollm2-135m", "calibration": 2}
    assert isinstance(suite.methods["matryoshka-search"], Retrofit)
    kv = {r["method"]: r["kv_bytes_per_token"] for r in method_kv_table(suite)}
    assert kv == {
        "control": 768, "mqa": 256, "mlkv-pairs": 384, "mla": 384, "matryoshka-32": 384,
        "matryoshka-search": 384, "matryoshka-search-after": 384,
        "context-l0": (29 * 768 + 288 * 2 / 32) / 30,  # context_dim 576 / 2
    }  # fmt: skip
    cells = {c.method: c for c in plan_cells(suite) if c.regime == "train"}
    assert cells["mqa"].model == {
        "pretrained": {"from": "smollm2-135m", "calibration": 2}, "to": "mqa", "recipe": "ce",
        "phase1_iters": None, "block_size": 128,
    }  # fmt: skip
    assert (cells["mqa"].train["lr"], cells["mqa"].train["warmup_frac"]) == (6e-4, 0.2)  # seed 002's
    assert cells["matryoshka-32"].train["lr"] == 5e-5  # seed 003's base lr
    assert load_suite("smollm2-retrofit-gpu").pretrained["from"] == "smollm2-135m"
    text = format_plan(suite, plan_cells(suite))
    assert "converted from smollm2-135m" in text and "matryoshka+search:0.5:0.5:16" in text


@pytest.mark.parametrize(
    "edit,message",
    [
        (("block_size = 32", ""), "model.block_size must be set"),
        (("block_size = 32", "block_size = 32\nn_layer = 4"), "unknown field(s) model.n_layer"),
        (('from = "SOURCE"', ""), "source.from must name"),
        (("calibration = 1", "calibration = 0"), "source.calibration=0"),
        (('mqa = "mqa"', 'mqa = "gqa3"'), "methods.mqa: --to 'gqa3': unknown step 'gqa3'"),
        (('recipe = "distill"', 'recipe = "kd"'), "methods.matryoshka-half.recipe='kd'"),
        (('to = "context:0", recipe = "oacd"', 'to = "mqa", recipe = "oacd"'), "needs a context step"),
        (("phase1_iters = 4", "phase1_iters = 0"), "phase1_iters=0"),
        (('mqa = "mqa"', 'mqa = { to = "mqa", lr = 1 }'), "unknown field(s) methods.mqa.lr"),
        (("search_after = true", 'search_after = "yes"'), "methods.matryoshka-after.search_after='yes' must"),
        (
            (
                '"matryoshka+search:0.5:0.5", recipe = "distill", search',
                '"matryoshka:4", recipe = "distill", search',
            ),
            "methods.matryoshka-after.search_after: --to 'matryoshka:4': searching after training needs",
        ),
    ],
)
def test_retrofit_suite_errors_name_the_field(tiny_source, edit, message):
    with pytest.raises(SuiteError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        _suite(tiny_source, RETRO_TOML.replace(*edit))
    assert "\n" not in str(e.value)


def test_retrofit_plan_kv_bytes_are_the_converted_models(tiny_source):
    """The dry-run's stand-in gives the bytes the real conversions have (search rows: their budget)."""
    run, _, _ = tiny_source
    suite = _suite(tiny_source)
    rows = {r["method"]: r for r in method_kv_table(suite)}
    source = load_model(run)
    calib = [torch.randint(0, 320, (2, 32))]
    for method in ("control", "mqa", "mla", "context-l0"):
        real = convert(source, suite.methods[method].to, calib).kv_metrics()["kv_bytes_per_token"]
        assert rows[method]["kv_bytes_per_token"] == real
    assert rows["matryoshka-half"]["kv_bytes_per_token"] == 0.5 * rows["control"]["kv_bytes_per_token"]


def test_retrofit_bench_end_to_end(tiny_source, monkeypatch):
    run, corpus, root = tiny_source
    monkeypatch.setenv("KVLAB_DATA", str(root / "data"))
    suite = _suite(tiny_source)
    out = root / "bench"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_bench(suite, out, log=lambda m: None)
        again = run_bench(suite, out, log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    assert not res.failed and res.trained == 6 and len(res.results) == 6
    assert again.trained == 0 and again.evaluated == 0  # resume by config hash, as from scratch

    rows = {r["method"]: r["metrics"] for r in json.loads((out / "results.json").read_text())["rows"]}
    mean = lambda m, k: rows[m][k]["mean"]  # noqa: E731
    for method in rows:
        assert mean(method, "heldout_loss") < mean(method, "step0.heldout_loss"), method  # uptraining helps
        assert mean(method, "val_loss") < mean(method, "step0.val_loss"), method
    # Step 0 of the control is the source itself, scored by the same evaluation: equal to scoring it directly
    # (up to float rounding of another batching: the source's run scores in batches of its own size).
    direct = evaluate(run, heldout=["heldout"], limit=6, speed=False)
    assert mean("control", "step0.heldout_loss") == pytest.approx(direct["heldout_loss"], rel=1e-6)
    # Every reduced structure starts worse than the source, and keeps its bytes through uptraining.
    for method in ("mqa", "mla", "matryoshka-half", "matryoshka-after", "context-l0"):
        assert mean(method, "step0.heldout_loss") > direct["heldout_loss"]
        assert mean(method, "kv_bytes_per_token") < mean("control", "kv_bytes_per_token")
    assert mean("mqa", "kv_bytes_per_token") == mean("control", "kv_bytes_per_token") / 4
    assert mean("matryoshka-half", "kv_bytes_per_token") <= mean("control", "kv_bytes_per_token") / 2
    # The saved uptrained Matryoshka run is at the searched ranks, not at the last randomly sampled ones.
    mat = next(c for c in res.results if c["method"] == "matryoshka-half")
    step0 = load_model(out / mat["run_dir"] / "step0")
    final = load_model(out / mat["run_dir"])
    assert final.kv_metrics() == step0.kv_metrics()
    # search_after: trained at full rank with sampled ranks, then searched from full rank into searched/,
    # which is what the row scores; step 0 is the search at conversion (the same bytes before training)
    after = next(c for c in res.results if c["method"] == "matryoshka-after")
    trained = load_model(out / after["run_dir"])
    searched = load_model(out / after["run_dir"] / "searched")
    full = mean("control", "kv_bytes_per_token")
    assert trained.kv_metrics()["kv_bytes_per_token"] == full
    assert (
        searched.kv_metrics()["kv_bytes_per_token"]
        == mean("matryoshka-after", "kv_bytes_per_token")
        <= full / 2
    )
    assert load_model(out / after["run_dir"] / "step0").kv_metrics() == step0.kv_metrics()
    direct_after = evaluate(out / after["run_dir"] / "searched", heldout=["heldout"], limit=6, speed=False)
    assert mean("matryoshka-after", "heldout_loss") == pytest.approx(direct_after["heldout_loss"], rel=1e-6)
    md = (out / "results.md").read_text()
    assert "heldout loss at step 0 train" in md and "matryoshka+search:0.5:0.5" in md
    assert "matryoshka+search:0.5:0.5 after training" in md
    assert (out / "pareto.png").stat().st_size > 10_000
