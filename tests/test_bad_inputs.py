"""Every class of bad input to the CLI ends in one line `kvlab: error: ...`, exit code 2, and no file
changed; the Python API raises kvlab's own errors for the same mistakes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kvlab import GPT
from kvlab.cli import main
from kvlab.errors import KvlabError
from test_train import make_dataset

TINY = [
    "train.max_iters=2",
    "train.eval_interval=2",
    "train.eval_iters=1",
    "train.batch_size=2",
    "train.grad_accum=1",
    "train.device=cpu",
    "train.tensorboard=false",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "model.block_size=16",
]


def _train_argv(out, data, *sets):
    return ["train", "--out", str(out), "--data", str(data), "--no-progress", "--set", *TINY, *sets]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a finished run, a run with no checkpoint, and odd files, shared by every case."""
    root = tmp_path_factory.mktemp("bad")
    torch.set_num_threads(1)
    data = make_dataset(root / "data")
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"] = {"train": {"tokens": 6000}, "val": {"tokens": 1500}}
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(_train_argv(root / "run", data)) == 0
    nockpt = root / "nockpt"
    nockpt.mkdir()
    shutil.copy(root / "run" / "config.json", nockpt / "config.json")
    other = make_dataset(root / "other")  # same shape, another tokenizer's name
    meta_o = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta_o, "tokenizer": "gpt2"}))
    shutil.copy(other / "val.bin", other / "heldout.bin")
    short = make_dataset(root / "short")
    (short / "meta.json").write_text(json.dumps(meta))
    np.zeros(100, dtype=np.uint16).tofile(short / "train.bin")  # meta.json records 6000 tokens
    odd = make_dataset(root / "odd")
    with open(odd / "train.bin", "ab") as f:
        f.write(b"\x01")  # 12001 bytes of uint16
    (root / "afile").write_text("not a directory\n")
    (root / "noise.txt").write_bytes(bytes(range(256)) * 8)  # a binary file named like text
    hello = root / "hello"
    hello.mkdir()
    (hello / "config.json").write_text(json.dumps({"model": "hello"}))
    return root


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        elif p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
    return out


NO_CUDA = not torch.cuda.is_available()
CASES = [
    # train: --set values of the wrong type name the field and the type; strings are never booleans
    (["T", "train.lr=abc"], "train.lr"),
    (["T", "train.compile=maybe"], "train.compile"),
    (["T", "model.bias=yes"], "model.bias"),
    (["T", "train.max_iters=1.5"], "train.max_iters"),
    (["T", "model.n_head=four"], "model.n_head"),
    (["T", "model.vocab_size=20"], "vocab_size"),
    (["T", "train.device=banana"], "banana"),
    pytest.param(["T", "train.device=cuda"], "cuda", marks=pytest.mark.skipif(not NO_CUDA, reason="GPU")),
    # train: --out that cannot be a run directory, or holds a finished run
    (["train", "--out", "{root}/afile", "--data", "{root}/data", "--no-progress"], "afile"),
    (["train", "--out", "{root}/afile/run", "--data", "{root}/data", "--no-progress"], "afile"),
    (["train", "--out", "{root}/run", "--data", "{root}/data", "--no-progress", "--set", *TINY], "--resume"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--set", "train.lr=0.5"], "train.lr"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--set", "model.n_layer=3"], "n_layer"),
    (["train", "--out", "{root}/nockpt", "--resume", "--no-progress"], "nothing to resume"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--data", "{root}/other"], "data.dir"),
    # train: token files that do not match meta.json
    (["train", "--out", "{root}/new", "--data", "{root}/short", "--no-progress", "--set", *TINY], "records"),
    (
        ["train", "--out", "{root}/new", "--data", "{root}/odd", "--no-progress", "--set", *TINY],
        "whole number",
    ),
    (["data", "prepare", "--root", "{root}/afile"], "afile"),
    (["data", "prepare", "--corpus", "{root}/noise.txt", "--root", "{root}/dr"], "binary file"),
    (["eval", "{root}/hello"], "must be an object of model fields"),
    # eval
    (["eval", "{root}/run", "--limit", "0"], "--limit"),
    (["eval", "{root}/run", "--limit", "-1"], "--limit"),
    (["eval", "{root}/run", "--eval-iters", "0"], "--eval-iters"),
    (["eval", "{root}/run", "--device", "banana"], "banana"),
    pytest.param(
        ["eval", "{root}/run", "--device", "cuda"],
        "cuda",
        marks=pytest.mark.skipif(not NO_CUDA, reason="GPU"),
    ),
    (["eval", "{root}/nockpt", "--no-speed"], "no checkpoint"),
    (["eval", "{root}/run", "--no-speed", "--heldout", "{root}/other"], "tokenizer"),
    # generate
    (["G", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["G", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "{root}/run", "--prompt-ids", "-1"], "token id"),
    (["generate", "{root}/run", "--prompt-ids", "a,b"], "--prompt-ids"),
    (["G", "--top-k", "0"], "--top-k"),
    (["G", "--temperature", "-1"], "--temperature"),
    (["G", "--eos-id", "99999"], "--eos-id"),
    (["G", "--device", "banana"], "banana"),
    (["generate", "{root}/nockpt", "--prompt-ids", "1"], "no checkpoint"),
]


@pytest.mark.parametrize("argv, needle", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(argv, needle, world, capsys):
    if argv[0] == "T":
        argv = _train_argv("{root}/new", "{root}/data", argv[1])
    elif argv[0] == "G":
        argv = ["generate", "{root}/run", "--prompt-ids", "1,2", *argv[1:]]
    argv = [a.replace("{root}", str(world)) for a in argv]
    before = _snapshot(world)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: ") and "\n" not in err, err
    assert needle in err, err
    assert _snapshot(world) == before
    shutil.rmtree(world / "new", ignore_errors=True)  # an empty run dir a refused run may have made


def test_debug_flag_shows_the_traceback(world, capsys):
    argv = ["--debug", "eval", str(world / "run"), "--limit", "0"]
    with pytest.raises(KvlabError, match="--limit"):
        main(argv)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda m: m(torch.tensor([1, 2, 3])), "(B, T)"),
        (lambda m: m(torch.tensor([[1.0, 2.0]])), "integer"),
        (lambda m: m(torch.tensor([[1, 500]])), "500"),
        (lambda m: m(torch.tensor([[-1, 2]])), "-1"),
        (lambda m: m.new_cache(1, 8, dtype=torch.int32), "floating"),
        (lambda m: m.kv_cache_bytes(batch_size=-2, max_len=8), "batch_size"),
        (lambda m: m.kv_cache_bytes(batch_size=1, max_len=0), "max_len"),
    ],
)
def test_python_api_raises_kvlab_errors(call, needle):
    from kvlab import ModelConfig

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64, attention="gqa"))
    with pytest.raises(KvlabError) as e:
        call(model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _disk_full(path):
    Path(path).write_bytes(b"\0" * 1000)  # a partial file, as a full disk leaves one
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("target", ["resume state", "weights"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(target, world, tmp_path, monkeypatch, capsys):
    from kvlab.checkpoint import load_model
    from kvlab.train import checkpointing as ckpt

    run = tmp_path / "full"
    argv = _train_argv(run, world / "data", "train.max_iters=4")
    calls = []
    # torch.save(obj, path) writes resume.pt, write_weights(path, state) model.safetensors
    owner, name, at = (ckpt.torch, "save", 1) if target == "resume state" else (ckpt, "write_weights", 0)
    real = getattr(owner, name)

    def flaky(*args):
        calls.append(1)
        return _disk_full(args[at]) if len(calls) > 1 else real(*args)  # the 2nd checkpoint: disk full

    monkeypatch.setattr(owner, name, flaky)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: disk full") and "step 2 is intact" in err and "\n" not in err, err
    monkeypatch.undo()
    assert [m["step"] for m in ckpt.read_metrics(run)] == [2] and ckpt.load_resume_state(run)["step"] == 2
    load_model(run)  # the previous checkpoint is whole and loadable
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # space freed: go on
    assert [m["step"] for m in ckpt.read_metrics(run)] == [2, 4]


def test_run_files_follow_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(_train_argv(tmp_path / "u", world / "data")) == 0
    finally:
        os.umask(old)
    run = tmp_path / "u"
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "resume.pt"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_divergence_warning_above_twice_chance(world, tmp_path, monkeypatch, capsys):
    """A loss climbing far above chance (ln V) without NaN is named once on stderr; the run still ends."""
    import kvlab.train.loop as loop

    real = loop.estimate_val_loss
    monkeypatch.setattr(loop, "estimate_val_loss", lambda *a: 1e6 if real(*a) else 0.0)  # a diverging run
    assert main(_train_argv(tmp_path / "div", world / "data", "train.max_iters=4")) == 0
    err = capsys.readouterr().err
    assert err.count("kvlab: warning: val_loss 1e+06 at step 2") == 1 and "diverging" in err, err
    monkeypatch.undo()
    assert main(_train_argv(tmp_path / "ok", world / "data")) == 0
    assert "warning" not in capsys.readouterr().err
