"""The benchmark: suite parsing and its errors, the plan (KV bytes of seed 000's baselines), config-hash
resume, mean/std aggregation, the Pareto frontier, and the report files (with a fake, counting backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvlab import GPT, ModelConfig
from kvlab.bench import (
    SuiteError,
    aggregate,
    config_hash,
    load_suite,
    pareto_front,
    parse_suite,
    plan_cells,
    run_bench,
)
from kvlab.bench.plan import format_plan, method_kv_table, tokens_per_run
from kvlab.bench.report import markdown_table, mean_std
from kvlab.cli import main

MICRO_TOML = """
[suite]
name = "micro"
description = "tiny"
seeds = 2
seed = 7

[model]
preset = "cpu-tiny"
n_layer = 2
n_head = 4
n_embd = 32
block_size = 32

[data]
corpus = "shakespeare"
tokenizer = "bpe-8k"

[train]
max_iters = 3
batch_size = 2
eval_interval = 3
eval_iters = 1

[eval]
limit = 5

[methods]
mha = "mha"
mqa = "mqa"
"gqa2-cla" = { kind = "gqa", n_kv_heads = 2, kv_share = "every:2" }

[regimes.train]
heldout = "heldout"

[regimes.eval-other]
heldout = "sotu"

[regimes.short]
model = { block_size = 16 }
"""


def micro_suite(text: str = MICRO_TOML, tmp_path: Path | None = None):
    import tomllib

    return parse_suite(tomllib.loads(text), source="micro.toml")


class FakeBackend:
    """Counts calls; 'trains' by writing config.json; metrics are a known function of the config."""

    def __init__(self, interrupt_after: int | None = None):
        self.trained: list[tuple[str, int]] = []
        self.evaluated: list[tuple[str, str]] = []
        self.interrupt_after = interrupt_after

    def prepare(self, data):
        return Path("/nonexistent/data")

    def train(self, model_cfg, train_cfg, data_dir, out_dir):
        if self.interrupt_after is not None and len(self.trained) == self.interrupt_after:
            raise KeyboardInterrupt
        self.trained.append((str(out_dir), train_cfg["seed"]))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": train_cfg}))
        return out_dir

    def evaluate(self, run_dir, heldout, data_dir, **options):
        self.evaluated.append((str(run_dir), heldout))
        cfg = json.loads((run_dir / "config.json").read_text())
        with torch.device("meta"):
            kv = GPT(ModelConfig.from_dict(cfg["model"])).kv_metrics()
        seed = cfg["train"]["seed"]
        loss = 4.0 + 10.0 / kv["kv_bytes_per_token"] + 0.1 * (seed - 7) + (0.5 if heldout == "sotu" else 0.0)
        return {
            "val_loss": loss - 0.2,
            "heldout_loss": loss,
            "generation_toks_per_s": 100.0 + seed,
            **kv,
            "measured_cache_bytes": 4096,
            "analytic_cache_bytes": 4096,
            # a fake "current chunk": 64 bytes spread over the context, so it depends on the regime
            "measured_cache_bytes_per_token": kv["kv_bytes_per_token"] + 64 / cfg["model"]["block_size"],
            "cache_tokens": cfg["model"]["block_size"],
            "cloze": {"lambada_accuracy": 0.25},
            "note": "strings are dropped",
        }


# ---- suites and their errors -------------------------------------------------------------------------
def test_builtin_suites_parse():
    demo = load_suite("cpu-demo")
    assert demo.model_preset == "cpu-tiny" and len(demo.seeds) >= 2
    kinds = {c.kind for c in demo.methods.values()}
    assert {"gqa", "mla", "matryoshka", "context"} <= kinds
    assert {"mha", "gqa", "mqa", "mla", "cla2"} <= set(demo.methods)
    s124 = load_suite("seed-124m")
    assert [r.name for r in s124.regimes] == [
        "train-ctx1024",
        "train-ctx256",
        "eval-wikitext2",
        "eval-wikitext103",
        "eval-lambada",
    ]
    assert [r.heldout for r in s124.regimes][2:] == ["wikitext-2", "wikitext-103", "lambada"]


def test_user_suite_from_file(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text(MICRO_TOML)
    suite = load_suite(str(path))
    assert suite.name == "micro" and suite.seeds == (7, 8)
    assert suite.methods["gqa2-cla"].n_kv_heads == 2 and suite.methods["gqa2-cla"].kv_share == "every:2"
    assert suite.methods["mqa"].n_kv_heads == 1  # preset resolved on the suite's model (4 heads)
    assert suite.model_config("mha", suite.regimes[2]).block_size == 16
    assert suite.with_seeds(3).seeds == (7, 8, 9)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t + "\n[bogus]\nx = 1\n", "unknown field(s) bogus"),
        (lambda t: t.replace('preset = "cpu-tiny"', 'preset = "gpt5"'), "model.preset='gpt5'"),
        (lambda t: t.replace("n_layer = 2", "n_layers = 2"), "model.n_layers"),
        (lambda t: t.replace('mqa = "mqa"', 'mqa = "mqb"'), "methods.mqa: unknown attention preset 'mqb'"),
        (lambda t: t.replace("n_kv_heads = 2,", "n_kv_heads = 3,"), "methods.gqa2-cla"),
        (
            lambda t: t.replace('kind = "gqa", n_kv_heads', 'kind = "gqa", n_kv_head'),
            "n_kv_head is not an option of attention kind='gqa'",
        ),
        (lambda t: t.replace("seeds = 2", "seeds = 0"), "suite.seeds=0"),
        (lambda t: t.replace("max_iters = 3", "max_iters = -3"), "train.max_iters=-3"),
        (lambda t: t.replace("max_iters = 3", "max_iter = 3"), "unknown train field"),
        (lambda t: t.replace('heldout = "sotu"', "heldout = 3"), "regimes.eval-other.heldout=3"),
        (
            lambda t: t.replace('heldout = "sotu"', 'heldout = "wikitxt-2"'),
            "heldout='wikitxt-2' is not a corpus",
        ),
        (lambda t: t.replace("block_size = 16", "blok_size = 16"), "regimes.short.model.blok_size"),
        (lambda t: t.split("[methods]")[0] + "[regimes.a]\n", "no [methods]"),
        (lambda t: t.split("[regimes.train]")[0], "no [regimes]"),
        (lambda t: t.replace("[suite]", '[suite]\npareto_regime = "nope"'), "suite.pareto_regime='nope'"),
        (lambda t: t.replace("[data]", "[data"), "invalid TOML"),
        # caught by --dry-run, not when the bench starts (issue 12)
        (
            lambda t: t.replace('corpus = "shakespeare"', 'corpus = "nosuchcorpus"'),
            "data.corpus='nosuchcorpus'",
        ),
        (lambda t: t.replace('"bpe-8k"', '"nosuchtok"'), "data.tokenizer='nosuchtok' is not a tokenizer"),
        (lambda t: t.replace("[data]", '[data]\nroot = "/tmp"'), "unknown field(s) data.root"),
        (lambda t: t.replace("max_iters = 3", 'max_iters = 3\ncompile = "maybe"'), "train"),
        (lambda t: t.replace("limit = 5", "limit = 0"), "eval.limit=0 must be a positive integer"),
        (
            lambda t: t.replace("limit = 5", 'limit = 5\nspeed = "no"'),
            "eval.speed='no' must be true or false",
        ),
    ],
)
def test_suite_errors_name_file_and_field(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(MICRO_TOML))
    with pytest.raises(SuiteError) as e:
        plan_cells(load_suite(str(path)))  # train fields are checked when the cells are resolved
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "bad.toml" in str(e.value)


def test_unknown_suite_and_missing_file(tmp_path, capsys):
    with pytest.raises(SuiteError, match="unknown suite 'nope'; choose one of cpu-demo, seed-124m"):
        load_suite("nope")
    with pytest.raises(SuiteError, match="not found"):
        load_suite(str(tmp_path / "missing.toml"))
    assert main(["bench", "--suite", "nope", "--dry-run"]) == 2
    assert "kvlab: error: unknown suite 'nope'" in capsys.readouterr().err


# ---- the plan -----------------------------------------------------------------------------------------
def test_seed_124m_plan_kv_bytes_and_budget(capsys):
    suite = load_suite("seed-124m")
    kv = {r["method"]: r["kv_bytes_per_token"] for r in method_kv_table(suite)}
    assert {k: kv[k] for k in ("mha", "gqa", "mqa", "mla")} == {
        "mha": 3072,
        "gqa": 768,
        "mqa": 256,
        "mla": 640,
    }
    assert kv["cla2"] == 1536  # half the layers own MHA-sized KV
    cells = plan_cells(suite)
    assert len(cells) == len(suite.methods) * 5
    # eval-* regimes reuse the ctx1024 run: two training runs per method
    assert len({c.train_key for c in cells}) == 2 * len(suite.methods)
    ctx1024 = next(c for c in cells if c.regime == "train-ctx1024")
    assert tokens_per_run(ctx1024) == 5000 * 12 * 5 * 1024
    assert main(["bench", "--suite", "seed-124m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "16 training runs" in out and "307.2M tokens" in out and "reuses train-ctx1024's run" in out
    mha_line = next(line for line in out.splitlines() if line.strip().startswith("mha "))
    assert "3072" in mha_line and "36864" in mha_line  # per layer, and summed over 12 layers


def test_config_hash_stable_and_sensitive():
    assert config_hash({"b": 1, "a": [1, 2.5]}) == config_hash({"a": [1, 2.5], "b": 1})
    assert config_hash({"a": 1}) == "015abd7f5cc57a2d"  # pinned: the hash must not change across versions
    suite = micro_suite()
    keys = [c.key for c in plan_cells(suite)]
    assert keys == [c.key for c in plan_cells(micro_suite())]  # same config -> same key, every time
    assert len(set(keys)) == len(keys)
    # renaming a method or a regime does not change what is trained: keys are reused
    renamed = micro_suite(
        MICRO_TOML.replace('mha = "mha"', 'baseline = "mha"').replace("[regimes.train]", "[regimes.tr]")
    )
    assert {c.key for c in plan_cells(renamed)} == set(keys)
    # any change to model, attention, training, data, held-out corpus or seed changes the key
    for old, new in [
        ("n_embd = 32", "n_embd = 64"),
        ('mha = "mha"', 'mha = "gqa"'),
        ("max_iters = 3", "max_iters = 4"),
        ("batch_size = 2", "batch_size = 2\nlr = 1e-3"),
        ('corpus = "shakespeare"', 'corpus = "sotu"'),
        ('heldout = "sotu"', 'heldout = "lambada"'),
        ("limit = 5", "limit = 6"),
        ("seed = 7", "seed = 8"),
    ]:
        changed = {c.key for c in plan_cells(micro_suite(MICRO_TOML.replace(old, new)))}
        assert changed != set(keys), (old, new)
        assert len(changed & set(keys)) < len(keys), (old, new)
    # regimes that train the same model share the run; a different block_size trains its own
    c = {(x.method, x.regime, x.seed): x for x in plan_cells(suite)}
    assert c[("mha", "train", 7)].train_key == c[("mha", "eval-other", 7)].train_key
    assert c[("mha", "train", 7)].train_key != c[("mha", "short", 7)].train_key
    assert c[("mha", "train", 7)].train_key != c[("mha", "train", 8)].train_key


# ---- running, resuming --------------------------------------------------------------------------------
def test_resume_trains_only_missing_cells(tmp_path):
    suite = micro_suite()
    cells = plan_cells(suite)
    n_runs = len({c.train_key for c in cells})
    assert (len(cells), n_runs) == (18, 12)  # 3 methods x 3 regimes x 2 seeds; 2 runs per method-seed
    first = FakeBackend(interrupt_after=5)
    with pytest.raises(KeyboardInterrupt):
        run_bench(suite, tmp_path, backend=first, log=lambda m: None)
    assert len(first.trained) == 5
    second = FakeBackend()
    res = run_bench(suite, tmp_path, backend=second, log=lambda m: None)
    assert len(second.trained) == n_runs - 5 == res.trained
    assert not {d for d, _ in second.trained} & {d for d, _ in first.trained}  # nothing trained twice
    done_before = len(first.evaluated)
    assert len(second.evaluated) == len(cells) - done_before
    third = FakeBackend()
    res = run_bench(suite, tmp_path, backend=third, log=lambda m: None)
    assert third.trained == [] and third.evaluated == [] and len(res.results) == len(cells)
    # one more seed: only that seed's runs train
    fourth = FakeBackend()
    run_bench(suite.with_seeds(3), tmp_path, backend=fourth, log=lambda m: None)
    assert sorted({s for _, s in fourth.trained}) == [9] and len(fourth.trained) == n_runs // 2
    for c in cells:
        rec = json.loads((tmp_path / "cells" / c.key / "eval.json").read_text())
        assert rec["config"]["train"]["seed"] == c.seed and rec["train_key"] == c.train_key


def test_failed_cell_is_reported_and_others_finish(tmp_path):
    class Broken(FakeBackend):
        def train(self, model_cfg, train_cfg, data_dir, out_dir):
            if model_cfg.attention.n_kv_heads == 1:
                raise RuntimeError("boom")
            return super().train(model_cfg, train_cfg, data_dir, out_dir)

    suite = micro_suite().with_seeds(1)
    res = run_bench(suite, tmp_path, backend=Broken(), log=lambda m: None)
    assert len(res.failed) == 3 and all("boom" in f["error"] for f in res.failed)
    assert {r["method"] for r in res.results} == {"mha", "gqa2-cla"}
    assert (tmp_path / "cells" / res.failed[0]["key"] / "error.txt").read_text().count("RuntimeError") >= 1


# ---- aggregation and reports --------------------------------------------------------------------------
def _fake_result(method, regime, seed, **metrics):
    config = {"model": {"attention": {"kind": "gqa"}}, "train": {"seed": seed}, "data": {}, "eval": {}}
    return {
        "method": method,
        "regime": regime,
        "seed": seed,
        "key": f"{method}{regime}{seed}",
        "metrics": metrics,
        "config": config,
    }


def test_aggregate_mean_std_and_markdown():
    results = [
        _fake_result(
            "a",
            "r",
            1,
            heldout_loss=1.0,
            kv_bytes_per_token=512,
            measured_cache_bytes=8,
            analytic_cache_bytes=8,
        ),
        _fake_result(
            "a",
            "r",
            2,
            heldout_loss=2.0,
            kv_bytes_per_token=512,
            measured_cache_bytes=8,
            analytic_cache_bytes=8,
        ),
        _fake_result(
            "a",
            "r",
            3,
            heldout_loss=4.0,
            kv_bytes_per_token=512,
            measured_cache_bytes=8,
            analytic_cache_bytes=8,
        ),
        _fake_result(
            "b",
            "r",
            1,
            heldout_loss=3.0,
            kv_bytes_per_token=64,
            measured_cache_bytes=8,
            analytic_cache_bytes=9,
        ),
    ]
    rows = aggregate(results, ["a", "b", "c"], ["r"])
    assert [r["method"] for r in rows] == ["a", "b"]
    h = rows[0]["metrics"]["heldout_loss"]
    assert h["values"] == [1.0, 2.0, 4.0] and h["mean"] == pytest.approx(7 / 3)
    assert h["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert rows[1]["metrics"]["heldout_loss"] == {"mean": 3.0, "std": 0.0, "values": [3.0]}
    assert rows[0]["cache_bytes_match"] is True and rows[1]["cache_bytes_match"] is False
    assert rows[0]["seeds"] == [1, 2, 3] and "seed" not in rows[0]["config"]["train"]
    md = markdown_table(rows, ["a", "b"], ["r"])
    a_line = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert (
        "2.333 ± 1.528" in a_line
        and "| 512 | 1,536 |" not in a_line
        and "| 512 |" in a_line
        and "| yes |" in a_line
    )
    assert "**NO**" in next(line for line in md.splitlines() if line.startswith("| b |"))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_pareto_front_known_points():
    pts = [(512, 4.0), (256, 4.1), (128, 4.5), (64, 4.4), (256, 4.3), (32, 5.0), (512, 4.2), (64, 4.4)]
    # (128, 4.5) is beaten by (64, 4.4); (256, 4.3) by (256, 4.1); (512, 4.2) by (512, 4.0);
    # the two equal (64, 4.4) points do not dominate each other
    assert pareto_front(pts) == [5, 3, 7, 1, 0]
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([]) == []


def test_report_files_from_a_bench(tmp_path, capsys):
    suite = micro_suite()
    res = run_bench(suite, tmp_path, backend=FakeBackend(), log=print)
    log = capsys.readouterr().out
    assert "[1/18] mha | train | seed 7" in log and "progress 18/18 (100%)" in log
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["regime"]): r for r in data["rows"]}
    assert len(rows) == 9 and data["seeds"] == [7, 8]
    # the machine and commit of the report and of every cell (all made by this run here)
    assert data["environment"]["torch"] == torch.__version__
    assert data["cell_commits"] == [data["environment"]["git_commit"] or "unrecorded"]
    mha = rows[("mha", "train")]
    # FakeBackend: heldout = 4 + 10 / kv_bytes + 0.1 * (seed - 7): seeds 7, 8 -> mean +0.05, std 0.0707
    expected = 4.0 + 10.0 / 128 + 0.05  # mha: 2 (K, V) x 4 heads x head_dim 8 x 2 bytes = 128
    assert mha["metrics"]["heldout_loss"]["mean"] == pytest.approx(expected)
    assert mha["metrics"]["heldout_loss"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    assert mha["metrics"]["cloze.lambada_accuracy"]["mean"] == 0.25 and "note" not in mha["metrics"]
    assert mha["config"]["model"]["n_embd"] == 32
    assert mha["config"]["eval"] == {"limit": 5, "heldout": "heldout"}
    assert rows[("mha", "eval-other")]["metrics"]["heldout_loss"]["mean"] == pytest.approx(expected + 0.5)
    md = (tmp_path / "results.md").read_text()
    assert f"{expected:.3f} ± 0.071" in md and "heldout loss eval-other ↓" in md
    # measured cache bytes per token next to KV B/token, per context length (train: 32, short: 16)
    assert "| KV B/token ↓ | measured B/token @ctx ↓ |" in md
    assert "| mha | gqa | 128 | 132 @16, 130 @32 | 256 |" in md  # 128 + 64/16, 128 + 64/32
    assert "| mqa | gqa | 32 | 36 @16, 34 @32 | 64 |" in md
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert len(res.results) == 18
    # the dry run of a finished bench says nothing is left to do
    assert "18 of 18 cells already finished" in format_plan(suite, plan_cells(suite), tmp_path)


def test_pareto_marks_the_measured_cache_bytes(tmp_path, monkeypatch):
    """Each point's measured bytes per token at its context: a hollow square on the same loss."""
    import matplotlib.axes

    from kvlab.bench.plot import plot_pareto
    from kvlab.bench.report import aggregate

    squares = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        if len(args) == 3 and args[2] == "s":
            squares.append((args[0], args[1], kwargs.get("label")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    results = [
        _fake_result("a", "r", 1, heldout_loss=4.0, kv_bytes_per_token=8, measured_cache_bytes_per_token=32),
        _fake_result("b", "r", 1, heldout_loss=3.5, kv_bytes_per_token=64, measured_cache_bytes_per_token=64),
    ]
    plot_pareto(aggregate(results, ["a", "b"], ["r"]), ["a", "b"], ["r"], tmp_path / "p.png", "t")
    assert [(x, y) for x, y, _ in squares] == [(32.0, 4.0), (64.0, 3.5)]
    assert squares[0][2] == "cache measured at the regime's context (bf16)" and squares[1][2] is None
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_close_bytes_share_one_tick_and_labels_never_overlap(tmp_path, monkeypatch):
    """743, 749.2 and 768 bytes print as one tick '743–768'; names of points at nearly the same bytes and
    loss are placed so that no two label boxes overlap, and a name pushed off its first place gets a line
    back to its point."""
    import matplotlib.axes

    from kvlab.bench.plot import plot_pareto, thin_ticks
    from kvlab.bench.report import aggregate

    ticks = thin_ticks([256, 384, 384, 743, 749.2, 768])
    assert [label for _, label in ticks] == ["256", "384", "743–768"]
    assert ticks[2][0] == pytest.approx(math.sqrt(743 * 768))
    offsets, leaders = [], {}
    original = matplotlib.axes.Axes.annotate

    def spy(self, text, xy, *args, **kwargs):
        if text:
            px, py = self.transData.transform(xy) * 72.0 / self.figure.dpi
            offsets.append((text, px + kwargs["xytext"][0], py + kwargs["xytext"][1]))
            leaders[text] = (kwargs["xytext"], kwargs.get("arrowprops"))
        return original(self, text, xy, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", spy)
    close = {"control": (768, 3.746), "context-l0": (743, 3.742), "m32": (384, 3.93), "msearch": (384, 4.0)}
    results = [_fake_result(m, "r", 1, heldout_loss=y, kv_bytes_per_token=x) for m, (x, y) in close.items()]
    plot_pareto(aggregate(results, list(close), ["r"]), list(close), ["r"], tmp_path / "p.png", "t")
    boxes = [(x, y, x + 6.2 * len(t), y + 11.0) for t, x, y in offsets]
    assert sorted(t for t, *_ in offsets) == sorted(close)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    moved = [t for t, (xytext, _) in leaders.items() if tuple(xytext) != (8, 6)]
    assert moved and all(leaders[t][1] is not None for t in moved)  # the moved ones point back
    assert all(arrow is None for xytext, arrow in leaders.values() if tuple(xytext) == (8, 6))


@pytest.mark.slow
def test_end_to_end_micro_bench(tmp_path, monkeypatch):
    """Real data -> train -> eval for 2 methods x 1 seed, a few iterations; measured == analytic bytes."""
    import random

    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "data"))
    rng = random.Random(0)
    words = (
        "the king queen crown sword castle river night day love war peace bread wine said went saw".split()
    )
    paragraphs = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(600)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs))
    text = MICRO_TOML.replace('corpus = "shakespeare"', f'corpus = "{corpus}"').replace(
        '"bpe-8k"', '"bpe-300"'
    )
    text = text.replace("seeds = 2", "seeds = 1").replace(
        '"gqa2-cla" = { kind = "gqa", n_kv_heads = 2, kv_share = "every:2" }', ""
    )
    text = text.split("[regimes.eval-other]")[0] + "[eval]\nword_perplexity = false\nspeed = false\n"
    text = text.replace("[eval]\nlimit = 5\n", "")
    suite = micro_suite(text)
    res = run_bench(suite, tmp_path / "out", log=lambda m: None)
    assert not res.failed and res.trained == 2 and len(res.results) == 2
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    for row in rows:
        m = row["metrics"]
        assert row["cache_bytes_match"] is True
        assert 0 < m["heldout_loss"]["mean"] < math.log(320) + 0.5  # at most a little above uniform
    assert {r["method"]: r["metrics"]["kv_bytes_per_token"]["mean"] for r in rows} == {"mha": 128, "mqa": 32}
    # a cache that grows by the same bytes per token: measured at the context == the asymptotic figure
    assert {r["method"]: r["metrics"]["measured_cache_bytes_per_token"]["mean"] for r in rows} == {
        "mha": 128,
        "mqa": 32,
    }
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 10_000
    again = run_bench(suite, tmp_path / "out", log=lambda m: None)
    assert again.trained == 0 and again.evaluated == 0
