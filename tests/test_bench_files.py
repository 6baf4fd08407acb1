"""Bench methods given by attention files: suite parsing, a cell key that covers the file's content, the
dry run's contained declaration, the report of a file row, and (slow) a tiny bench end to end with the
shipped fills, a file that crashes in forward and one that fails validation as failed cells."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from kvlab.bench import SuiteError, load_suite, plan_cells, run_bench
from kvlab.bench.methods import AttentionFile
from kvlab.bench.report import aggregate, markdown_table
from kvlab.cli import main
from kvlab.harness import init_attention
from kvlab.harness.template import template_text

FORWARD = "    def forward(self, x, state=None, pos=0):\n"

SUITE = """
[suite]
name = "files"
description = "attention files"
seeds = 1
seed = 7

[model]
preset = "cpu-tiny"
n_layer = 2
n_head = 4
n_embd = 32
block_size = 32

[data]
corpus = "CORPUS"
tokenizer = "bpe-300"

[train]
max_iters = 6
batch_size = 4
eval_interval = 6
eval_iters = 2
lr = 1e-2

[eval]
word_perplexity = false
limit = 20
tasks = ["piqa=PIQA"]

[methods]
mha = "mha"
gqa-file = { attention_file = "gqa.py" }
mla-file = { attention_file = "ABSOLUTE_MLA" }
crash = { attention_file = "crash.py" }
bad = { attention_file = "bad.py" }

[regimes.train]
heldout = "heldout"

[regimes.other]
heldout = ["heldout", "CORPUS"]
"""
PIQA = [
    {
        "goal": "Dry wet shoes",
        "sol1": "Stuff them with newspaper.",
        "sol2": "Fill them with water.",
        "label": 0,
    },
    {"goal": "Keep bread fresh", "sol1": "Leave it in the sun.", "sol2": "Seal it in a bag.", "label": 1},
    {"goal": "Cool soup fast", "sol1": "Stir it over ice.", "sol2": "Boil it longer.", "label": 0},
]


@pytest.fixture
def files_suite(tmp_path):
    """A suite file in suite/ with the gqa fill beside it, the mla fill elsewhere (absolute path), a file
    that crashes in forward and one that fails validation."""
    import random

    rng = random.Random(0)
    words = "the king queen crown sword castle river night day love war peace bread wine said went".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(600)))
    suite_dir, elsewhere = tmp_path / "suite", tmp_path / "elsewhere"
    init_attention(suite_dir / "gqa.py", "gqa")
    init_attention(elsewhere / "mla.py", "mla")
    text = template_text("mha")
    crash = FORWARD + "        raise ValueError('boom in forward')\n"
    (suite_dir / "crash.py").write_text(text.replace(FORWARD, crash))
    (suite_dir / "bad.py").write_text(text.replace(FORWARD, FORWARD + "        open('/tmp/x', 'w')\n"))
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text("".join(json.dumps(row) + "\n" for row in PIQA))
    path = suite_dir / "files.toml"
    text = SUITE.replace("CORPUS", str(corpus)).replace("ABSOLUTE_MLA", str(elsewhere / "mla.py"))
    path.write_text(text.replace("PIQA", str(piqa)))
    return path


def test_attention_file_methods_parse(files_suite):
    suite = load_suite(str(files_suite))
    gqa, mla = suite.methods["gqa-file"], suite.methods["mla-file"]
    assert isinstance(gqa, AttentionFile) and gqa.path == files_suite.parent / "gqa.py"  # next to the suite
    assert mla.path == files_suite.parent.parent / "elsewhere" / "mla.py" and mla.config == {}
    assert (gqa.time_limit, gqa.memory_limit_gb, gqa.kind) == (24 * 3600.0, 32.0, "file gqa.py")
    cfg = suite.model_config("gqa-file", suite.regimes[0])
    assert (cfg.family, cfg.n_layer, cfg.n_embd, cfg.block_size) == ("gpt2", 2, 32, 32)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('"gqa.py" }', '"missing.py" }', "methods.gqa-file.attention_file: "),
        ('"gqa.py" }', '"gqa.py", config = { kv_lora_rank = [1] } }', "methods.gqa-file.config="),
        ('"gqa.py" }', '"gqa.py", time_limit = 0 }', "methods.gqa-file.time_limit=0 must be a positive"),
        ('"gqa.py" }', '"gqa.py", limits = 1 }', "unknown field(s) methods.gqa-file.limits"),
        ('cpu-tiny"\n', 'smollm2-135m"\n', "runs on seed 000's nanoGPT substrate (family gpt2)"),
    ],
)
def test_attention_file_method_errors(files_suite, old, new, message):
    text = files_suite.read_text().replace(old, new, 1)
    if "smollm2" in new:  # a Llama-family model: only the file method, whose substrate must be GPT-2
        text = text.replace('mha = "mha"\n', "").replace("n_head = 4\n", "n_head = 8\n")
    files_suite.write_text(text)
    with pytest.raises(SuiteError) as e:
        load_suite(str(files_suite))
    assert message in str(e.value) and "files.toml" in str(e.value) and "\n" not in str(e.value)


def test_cell_key_covers_the_files_content_not_its_path(files_suite):
    keys = lambda: {(c.method, c.regime): c.key for c in plan_cells(load_suite(str(files_suite)))}
    before = keys()
    gqa = files_suite.parent / "gqa.py"
    cell = next(c for c in plan_cells(load_suite(str(files_suite))) if c.method == "gqa-file")
    assert cell.attention_file == str(gqa) and cell.config()["attention_file"] == str(gqa)
    assert len(cell.model["attention_file"]["sha256"]) == 64 and "attention" not in cell.model
    # any edit (even a comment outside the region) retrains that method only
    gqa.write_text(gqa.read_text() + "# edited\n")
    after = keys()
    assert {k for k in before if before[k] != after[k]} == {("gqa-file", "train"), ("gqa-file", "other")}
    # the same content elsewhere: the same cells (the key holds the content's hash, not the path)
    moved = files_suite.parent / "moved" / "same.py"
    moved.parent.mkdir()
    shutil.copy(gqa, moved)
    files_suite.write_text(files_suite.read_text().replace('"gqa.py"', '"moved/same.py"'))
    assert keys() == after
    # extra config for the file's code is part of the key
    with_config = '"moved/same.py", config = { x = 1 } }'
    files_suite.write_text(files_suite.read_text().replace('"moved/same.py" }', with_config))
    assert keys()[("gqa-file", "train")] != after[("gqa-file", "train")]


def test_dry_run_declares_file_bytes_from_a_contained_build(files_suite, capsys):
    assert main(["bench", "--suite", str(files_suite), "--dry-run"]) == 0
    out = capsys.readouterr().out
    row = lambda name: next(line.split() for line in out.splitlines() if line.strip().startswith(name + " "))
    # tiny shape: head_dim 8; gqa fill keeps n_head // 4 = 1 KV head: 2 * 1 * 8 * 2 B, sharing 4
    assert row("gqa-file")[1:3] == ["file", "gqa.py"] and row("gqa-file")[4:7] == ["32", "64", "4.00"]
    # mla fill: kv_lora_rank max(16, head_dim / 2) = 16 + one 8-wide RoPE key: (16 + 8) * 2 B
    assert row("mla-file")[4:6] == ["48", "96"] and row("mha")[3:5] == ["128", "256"]
    assert row("crash")[4] == "128"  # declared without running forward: it crashes only at run time
    assert "built in a contained child on the meta device" in out
    bad = out.split("bad: attention file ")[1].splitlines()
    assert bad[1].strip() == "violation: the file fails validation"
    assert bad[2].strip().endswith("forbidden-builtin: 'open' is not allowed in the region")


def _file_result(method, seed, mismatches, notes):
    config = {"model": {"attention_file": {}}, "train": {"seed": seed}, "data": {}, "eval": {},
              "attention_file": f"/x/{method}.py"}  # fmt: skip
    flags = ["MISMATCH layer 0: x"] * mismatches
    metrics = {"heldout_loss": 4.0, "kv_bytes_per_token": 64, "kv_measured_bytes_per_token": 126,
               "kv_mismatches": mismatches, "kv_notes": notes,
               "attention_file": {"path": f"/x/{method}.py", "kv_flags": flags}}  # fmt: skip
    return {"method": method, "regime": "r", "seed": seed, "key": method, "metrics": metrics,
            "config": config}  # fmt: skip


def test_report_shows_declared_and_measured_and_flags_a_mismatch():
    results = [_file_result("liar", 1, 1, 0), _file_result("honest", 1, 0, 2)]
    rows = aggregate(results, ["liar", "honest"], ["r"])
    assert rows[0]["cache_bytes_match"] is False and rows[1]["cache_bytes_match"] is True
    assert rows[0]["attention_file"]["kv_flags"] == ["MISMATCH layer 0: x"]
    md = markdown_table(rows, ["liar", "honest"], ["r"]).splitlines()
    assert md[2].startswith("| liar | file liar.py | 64 (measured 126) **MISMATCH** | – | – | **NO** |")
    assert md[3].startswith("| honest | file honest.py | 64 (measured 126) | – | – | yes (notes) |")


@pytest.mark.slow  # a dozen contained children start (torch imports): ~1-2 minutes on 2 busy cores
def test_a_tiny_bench_of_attention_files_end_to_end(files_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "data"))
    out, gqa_path = tmp_path / "out", files_suite.parent / "gqa.py"
    suite = load_suite(str(files_suite))
    res = run_bench(suite, out, log=lambda m: None)
    failed = {f["cell"]: f["error"] for f in res.failed}
    assert failed == {
        "crash | train | seed 7": "crashed: ValueError: boom in forward",
        "crash | other | seed 7": "crashed: ValueError: boom in forward",
        "bad | train | seed 7": "violation: the file fails validation: "
        f"{files_suite.parent / 'bad.py'}:99:9 forbidden-builtin: 'open' is not allowed in the region",
        "bad | other | seed 7": failed.get("bad | other | seed 7"),
    }
    assert failed["bad | other | seed 7"] == failed["bad | train | seed 7"]
    assert res.trained == 3  # mha, gqa-file, mla-file: the "other" regime reuses each run
    rows = {(r["method"], r["regime"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {(m, r) for m in ("mha", "gqa-file", "mla-file") for r in ("train", "other")}
    for (method, regime), row in rows.items():
        m = {k: v["mean"] for k, v in row["metrics"].items()}
        assert 0 < m["heldout_loss"] < math.log(320) + 0.5
        record = json.loads((out / "cells" / row["cells"][0] / "eval.json").read_text())
        metrics_file = out / "runs" / record["train_key"] / "metrics.jsonl"
        history = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        # the evaluation scores the batches training scored, on the trained weights: the same val_loss,
        # also in the regime that only loads the weights in a contained child of its own
        assert m["val_loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-6), (method, regime)
        if method == "mha":
            continue
        declared = {"gqa-file": 32, "mla-file": 48}[method]  # (1 KV head x 8) x 2 x 2 B; (16 + 8) x 2 B
        assert m["kv_bytes_per_token"] == m["kv_measured_bytes_per_token"] == declared
        assert m["file_cache_bytes_per_token"] == m["measured_cache_bytes_per_token"] == declared
        assert m["kv_mismatches"] == 0 and row["cache_bytes_match"] is True
        assert m["generation_toks_per_s"] > 0 and m["nocache_toks_per_s"] > 0
        assert row["attention_file"]["generation_method"].startswith("kvlab: cached greedy decoding")
    other = json.loads((out / "cells" / rows[("gqa-file", "other")]["cells"][0] / "eval.json").read_text())
    assert (out / "cells" / other["key"] / "contained" / "harness.json").is_file()  # evaluated contained
    # several corpora: heldout_loss is their unweighted mean, each corpus's loss kept (the training
    # corpus's split scored as in the train regime)
    losses = other["metrics"]["heldout_losses"]
    assert list(losses) == ["heldout", str(files_suite.parent.parent / "corpus.txt")]
    assert other["metrics"]["heldout_loss"] == pytest.approx(sum(losses.values()) / 2)
    train_cell = rows[("gqa-file", "train")]["metrics"]
    assert losses["heldout"] == pytest.approx(train_cell["heldout_loss"]["mean"], rel=1e-6)
    # the contained figures are kvlab.eval's on the trained model: recomputed here from the same weights
    from safetensors.torch import load_file

    from kvlab.data import load_tokenizer, open_split, prepare
    from kvlab.eval import heldout_loss
    from kvlab.eval.tasks import evaluate_tasks
    from kvlab.harness import SeedGPT, load_attention
    from kvlab.train.batches import read_meta
    from kvlab.train.rundir import resolve_vocab

    data_dir = prepare(**suite.data)
    cfg = suite.model_config("gqa-file", suite.regimes[0])
    model = SeedGPT(resolve_vocab(cfg, read_meta(data_dir), fixed=False), load_attention(gqa_path))
    model.load_state_dict(load_file(out / "runs" / other["train_key"] / "model.safetensors"), strict=False)
    model.eval()
    tokens = np.asarray(open_split(data_dir, "heldout"))
    assert heldout_loss(model, tokens, 32, 4, max_windows=20) == pytest.approx(losses["heldout"], rel=1e-6)
    piqa = f"piqa={files_suite.parent.parent / 'piqa.jsonl'}"
    tasks = evaluate_tasks(model, load_tokenizer(data_dir), piqa, 32, batch_size=4)
    assert other["metrics"]["tasks"]["piqa"]["items"] == 3
    for key in ("acc", "acc_norm"):
        assert other["metrics"]["tasks"]["piqa"][key] == tasks["piqa"][key]
    md = (out / "results.md").read_text()
    assert "| gqa-file | file gqa.py | 32 (measured 32) | 32 @32 | 64 | yes |" in md
    assert "| mla-file | file mla.py | 48 (measured 48) | 48 @32 | 96 | yes |" in md
    assert "## Failed cells" in md and "crash | train | seed 7 (cell " in md and "boom in forward" in md
    assert "## Attention files" in md and str(files_suite.parent / "gqa.py") in md
    assert (out / "pareto.png").stat().st_size > 10_000
    error = (out / "cells" / res.failed[0]["key"] / "error.txt").read_text()
    assert "crashed: ValueError: boom in forward" in error and "Traceback" in error
    # rerun: nothing trains again; only the failed cells are retried (and fail the same way)
    again = run_bench(suite, out, log=lambda m: None)
    assert again.trained == 0 and again.evaluated == 0 and len(again.failed) == 4
    # the CLI: the table, and exit 1 for the failed cells
    assert main(["bench", "--suite", str(files_suite), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "| gqa-file | file gqa.py | 32 (measured 32) |" in printed and "4 cell(s) failed" in printed
    # an edited file retrains that method only
    gqa_path.write_text(gqa_path.read_text() + "# edited\n")
    edited = run_bench(load_suite(str(files_suite)), out, log=lambda m: None)
    assert edited.trained == 1 and edited.evaluated == 2
