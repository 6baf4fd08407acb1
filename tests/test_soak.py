"""Kill soak: `kvlab train` SIGKILLed at seeded random instants (many inside checkpoint writes), resumed
each time, ends bit-identical to an uninterrupted run, and no kill ever leaves a mixed checkpoint.

A driver subprocess imports kvlab once and forks one child per training attempt (a fresh interpreter per
attempt would spend ~2 s importing torch each time); the children are killed from the driver, which
records what the run directory looks like after every kill. The assertions are made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_dataset

DRIVER = r"""
import json, os, random, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from kvlab.cli import main
# imported once here, not in every child (AdamW imports torch._dynamo: seconds)
import torch._dynamo, kvlab.train.loop, kvlab.data
from kvlab.train import checkpointing as ckpt

p = json.loads(sys.argv[1])
rng = random.Random(p["seed"])


def start(run, resume, log):
    pid = os.fork()
    if pid == 0:  # the child: one `kvlab train`, stderr to a file
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        code = 1
        try:
            code = main(["train", "--out", run, *p["argv"], *(["--resume"] if resume else [])])
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid):
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def snapshot(run):
    # what a reader sees right after a kill: the committed step, its metrics, its weights
    run = Path(run)
    steps = [m["step"] for m in ckpt.read_metrics(run)]
    out = {"metrics_steps": steps, "committed": None, "weights_match": None,
           "entries": sorted(e.name for e in run.iterdir()) if run.is_dir() else []}
    if ckpt.has_checkpoint(run):
        state = ckpt.load_resume_state(run)
        weights = load_file(run / "model.safetensors")
        out["committed"] = state["step"]
        out["weights_match"] = all(torch.equal(v, state["model"][k]) for k, v in weights.items())
    return out


def first_checkpoint_s(run, pid):
    # seconds until a run's first checkpoint write begins (start-up + the first steps)
    t0 = time.perf_counter()
    while not (os.path.isdir(run) and any(n.startswith(".step-") for n in os.listdir(run))):
        time.sleep(0.0005)
    return time.perf_counter() - t0


t0 = time.perf_counter()
pid = start(p["ref"], False, p["log"])
startup = first_checkpoint_s(p["ref"], pid)
assert wait(pid) == 0, open(p["log"]).read()
horizon = time.perf_counter() - t0
interval = (horizon - startup) / 30  # seconds per checkpoint (60 steps, one every 2)
link = os.path.join(p["run"], "checkpoint")
rounds, kills, resume = [], 0, False
while kills < p["kills"]:
    had = ckpt.has_checkpoint(Path(p["run"]))
    pid = start(p["run"], resume, p["log"])
    aimed = len(rounds) % 2 == 1  # every other kill waits for a checkpoint write to begin
    # random: after 0-2 new commits (counted, so progress does not depend on how busy the machine is),
    # then a random fraction of one checkpoint interval; 0 commits: anywhere in start-up
    commits, seen = rng.randint(0, 2), os.readlink(link) if os.path.islink(link) else None
    delay = rng.uniform(0, 1.2 * startup) if commits == 0 else rng.uniform(0, interval)
    deadline = time.perf_counter() + delay
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        names = os.listdir(p["run"]) if os.path.isdir(p["run"]) else []
        if aimed and any(n.startswith(".step-") for n in names):
            time.sleep(rng.uniform(0, 0.02))  # within the write, its renames, or just after
            os.kill(pid, signal.SIGKILL)
            break
        now_target = os.readlink(link) if os.path.islink(link) else None
        if now_target != seen:
            seen, commits = now_target, commits - 1
            deadline = time.perf_counter() + rng.uniform(0, interval)
        if not aimed and commits <= 0 and time.perf_counter() >= deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.0005)
    code = (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)) if done else wait(pid)
    kills += code == -9
    rounds.append({"aimed": aimed, "resume": resume, "had_checkpoint": had, "code": code,
                   "stderr": open(p["log"]).read(), **snapshot(p["run"])})
    if code == 0:
        break
    # resume every time; a run with nothing committed yet says so, and then starts afresh
    resume = not (code == 2 and "nothing to resume" in rounds[-1]["stderr"])
final = wait(start(p["run"], True, p["log"]))
print(json.dumps({"rounds": rounds, "final": final, "final_stderr": open(p["log"]).read(),
                  "final_entries": sorted(os.listdir(p["run"]))}))
"""

EVAL_INTERVAL = 2
SETS = [
    "train.max_iters=60",
    f"train.eval_interval={EVAL_INTERVAL}",
    "train.eval_iters=1",
    "train.batch_size=4",
    "train.grad_accum=2",
    "train.lr=1e-2",
    "train.device=cpu",
    "train.tensorboard=false",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=32",
    "model.block_size=32",
    "model.dropout=0.1",  # dropout draws from the torch RNG: resume must restore it
]


@pytest.mark.slow  # ~25 forked training attempts: ~30 s on 2 busy cores
def test_sigkill_soak_resumes_bit_identically(tmp_path):
    data = make_dataset(tmp_path / "data")
    params = {
        "seed": 12,
        "kills": 22,
        "ref": str(tmp_path / "ref"),
        "run": str(tmp_path / "run"),
        "log": str(tmp_path / "stderr.txt"),
        "argv": ["--data", str(data), "--attention", "gqa", "--no-progress", "--set", *SETS],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), json.dumps(params)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rounds = report["rounds"]
    assert sum(r["code"] == -9 for r in rounds) >= 20
    assert sum(r["aimed"] and r["code"] == -9 for r in rounds) >= 10  # killed inside checkpoint writes
    for r in rounds:
        # every attempt was killed, or refused honestly because nothing was committed yet
        honest_refusal = r["code"] == 2 and not r["had_checkpoint"] and "nothing to resume" in r["stderr"]
        assert r["code"] == -9 or honest_refusal, r
        # never a mixture: metrics end at the committed step, whose weights equal its resume state
        committed = r["committed"] or 0
        assert r["metrics_steps"] == list(range(EVAL_INTERVAL, committed + 1, EVAL_INTERVAL)), r
        assert r["weights_match"] in (None, True), r
    assert any(r["committed"] for r in rounds) and any(r["resume"] and r["had_checkpoint"] for r in rounds)
    assert report["final"] == 0, report["final_stderr"]
    # nothing half-written lingers: only the committed step directory and the run's own files
    entries = report["final_entries"]
    assert not [e for e in entries if e.startswith(".")], entries
    assert [e for e in entries if e.startswith("step-")] == ["step-00000060"], entries

    from kvlab.train.checkpointing import load_resume_state, read_metrics

    ref, run = tmp_path / "ref", tmp_path / "run"
    keys = ("step", "tokens", "train_loss", "val_loss", "lr")
    assert [[m[k] for k in keys] for m in read_metrics(run)] == [
        [m[k] for k in keys] for m in read_metrics(ref)
    ]
    wa, wb = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = load_resume_state(ref), load_resume_state(run)
    assert sa["step"] == sb["step"] == 60
    assert all(torch.equal(sa["rng"][k], sb["rng"][k]) for k in ("torch", "batch", "hook"))
