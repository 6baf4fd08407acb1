"""`torchrun --nproc_per_node 2 -m kvlab bench` (gloo, CPU): both ranks train every run together, rank 0
alone prepares the data, evaluates and writes, and the results equal a single-process bench's."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from kvlab.cli import main

SUITE = """
[suite]
name = "ddp"
description = "two ranks"
seeds = 1
seed = 3

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
batch_size = 2
grad_accum = 2
eval_interval = 3
eval_iters = 2
lr = 1e-2
device = "cpu"

[eval]
word_perplexity = false
speed = false
limit = 20

[methods]
mha = "mha"
mqa = "mqa"

[regimes.train]
heldout = "heldout"

[regimes.other]
heldout = "CORPUS"
"""

# Runs kvlab's CLI with every atomic file write, data preparation and evaluation logged with its rank.
WRAPPER = """
import os, sys
import kvlab.checkpoint as checkpoint

LOG = os.environ["KVLAB_TEST_LOG"]
rank = os.environ.get("RANK", "0")

def note(what):
    with open(LOG, "a") as f:
        f.write(f"{rank} {what}\\n")

_atomic_write = checkpoint.atomic_write
def atomic_write(path, write_fn):
    note(f"write {path}")
    return _atomic_write(path, write_fn)
checkpoint.atomic_write = atomic_write

import kvlab.data, kvlab.eval
for module, name in ((kvlab.data, "prepare"), (kvlab.eval, "evaluate")):
    def wrapped(*args, _fn=getattr(module, name), _name=name, **kwargs):
        note(_name)
        return _fn(*args, **kwargs)
    setattr(module, name, wrapped)

from kvlab.cli import main
sys.exit(main())
"""


def _numbers_close(a: str, b: str) -> None:
    """The same text, numbers equal to the last printed digit or two (DDP's float sums differ in order)."""
    ta, tb = re.split(r"(-?\d+\.\d+)", a), re.split(r"(-?\d+\.\d+)", b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        if re.fullmatch(r"-?\d+\.\d+", x):
            assert float(x) == pytest.approx(float(y), abs=2e-3)
        else:
            assert x == y


@pytest.mark.slow  # two torch processes start, train 4 runs and evaluate 4 cells: ~1 minute on 2 cores
def test_bench_under_torchrun_rank0_alone_prepares_evaluates_and_writes(tmp_path, monkeypatch):
    rng = random.Random(0)
    words = "the king queen crown sword castle river night day love war peace bread wine said went".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(600)))
    suite = tmp_path / "ddp.toml"
    suite.write_text(SUITE.replace("CORPUS", str(corpus)))
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "data"))
    env = {**os.environ, "KVLAB_TEST_LOG": str(log)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(wrapper), "bench", "--suite", str(suite), "--out", str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert {rank for rank, _ in calls} == {"0"}  # rank 1 trained (DDP) but wrote, prepared, scored nothing
    assert [what for _, what in calls].count("prepare") == 1
    assert [what for _, what in calls].count("evaluate") == 4  # 2 methods x 2 regimes
    written = [what.split(" ", 1)[1] for _, what in calls if what.startswith("write ")]
    for name in ("results.json", "results.md", "pareto.png", "suite.json"):
        assert written.count(str(tmp_path / "ddp" / name)) == 1, name
    assert proc.stdout.count("| mha | gqa |") == 1 and proc.stdout.count("wrote ") == 3  # printed once
    assert "2 ranks train together; rank 0 evaluates" in proc.stderr + proc.stdout
    run_dirs = sorted((tmp_path / "ddp" / "runs").iterdir())
    assert len(run_dirs) == 2  # the "other" regime scores each method's run on another corpus
    worlds = {json.loads((p / "config.json").read_text())["run"]["world_size"] for p in run_dirs}
    assert worlds == {2}  # every training run was a 2-rank DDP run

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1)
    try:
        assert main(["bench", "--suite", str(suite), "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(before)
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    names = lambda rows: [(r["method"], r["regime"]) for r in rows]
    assert names(ddp["rows"]) == names(single["rows"])
    assert len(ddp["rows"]) == 4 and ddp["failed"] == single["failed"] == []
    for a, b in zip(ddp["rows"], single["rows"]):
        assert a["cells"] == b["cells"] and a["config"] == b["config"]  # the same cells, the same keys
        assert set(a["metrics"]) == set(b["metrics"])
        for key, stat in a["metrics"].items():
            assert stat["mean"] == pytest.approx(b["metrics"][key]["mean"], rel=1e-4, abs=1e-6), key
    # the same training runs (single: the global batch in one process), and they learned
    for run in sorted((tmp_path / "ddp" / "runs").iterdir()):
        read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        a, b = read(run), read(tmp_path / "single" / "runs" / run.name)
        assert [m["step"] for m in a] == [m["step"] for m in b] == [3, 6]
        assert [m["val_loss"] for m in a] == pytest.approx([m["val_loss"] for m in b], rel=1e-5)
        assert b[-1]["val_loss"] < b[0]["val_loss"]
    md = [(tmp_path / d / "results.md").read_text() for d in ("ddp", "single")]
    _numbers_close(*md)
    assert (tmp_path / "ddp" / "pareto.png").stat().st_size > 10_000
