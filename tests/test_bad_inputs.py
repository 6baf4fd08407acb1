"""Every class of bad input to the CLI ends in one line `kvlab: error: ...`, exit code 2, and no file
changed; the Python API raises kvlab's own errors for the same mistakes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kvlab import GPT
from kvlab.cli import main
from kvlab.errors import KvlabError
from kvlab.generate import generate
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
    # finished runs whose config.json was damaged after training: resume and eval must say so in one line
    config = json.loads((root / "run" / "config.json").read_text())
    for name, damaged in (
        ("badmodel", {**config, "model": "hello"}),
        ("badtrain", {**config, "train": "x"}),
        ("badbeta", {**config, "train": {**config["train"], "beta1": 1.5}}),
    ):
        shutil.copytree(root / "run", root / name, symlinks=True)
        (root / name / "config.json").write_text(json.dumps(damaged))
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
    (["T", "train.device=tpu:0"], "tpu:0"),
    # train: TrainConfig checks its values' ranges (AdamW would raise a ValueError much later)
    (["T", "train.beta1=1.5"], "train.beta1"),
    (["T", "train.beta2=-0.5"], "train.beta2"),
    (["T", "train.lr=-1"], "train.lr"),
    (["T", "train.weight_decay=-0.1"], "train.weight_decay"),
    (["T", "train.grad_clip=-1"], "train.grad_clip"),
    (["T", "train.eval_interval=0"], "train.eval_interval"),
    (["T", "train.seed=-1"], "train.seed"),
    # train: the attention structure is --attention's; a --set model.attention would be ignored
    (["T", "model.attention=3"], "--attention"),
    (["T", "model.attention=banana"], "--attention"),
    (["T", 'model.attention={"kind": "mla"}'], "--attention"),
    pytest.param(["T", "train.device=cuda"], "cuda", marks=pytest.mark.skipif(not NO_CUDA, reason="GPU")),
    # train: --out that cannot be a run directory, or holds a finished run
    (["train", "--out", "{root}/afile", "--data", "{root}/data", "--no-progress"], "afile"),
    (["train", "--out", "{root}/afile/run", "--data", "{root}/data", "--no-progress"], "afile"),
    (["train", "--out", "{root}/run", "--data", "{root}/data", "--no-progress", "--set", *TINY], "--resume"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--set", "train.lr=0.5"], "train.lr"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--set", "model.n_layer=3"], "n_layer"),
    (["train", "--out", "{root}/nockpt", "--resume", "--no-progress"], "nothing to resume"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--data", "{root}/other"], "data.dir"),
    # train --resume: a flag that would be ignored is named (repeating the starting command is fine)
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--attention", "mla"], "--attention mla"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--preset", "pythia-70m"], "--preset"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--corpus", "sotu"], "--corpus sotu"),
    (["train", "--out", "{root}/run", "--resume", "--no-progress", "--tokenizer", "gpt2"], "--tokenizer"),
    (["train", "--out", "{root}/run", "--resume", "--overwrite", "--no-progress"], "--overwrite"),
    (
        ["train", "--out", "{root}/new", "--data", "{root}/data", "--corpus", "sotu", "--no-progress"],
        "--corpus",
    ),
    # train --resume / eval: a damaged config.json is named, not a traceback
    (["train", "--out", "{root}/badmodel", "--resume", "--no-progress"], '"model" must be an object'),
    (["train", "--out", "{root}/badtrain", "--resume", "--no-progress"], '"train" must be an object'),
    (["train", "--out", "{root}/badbeta", "--resume", "--no-progress"], "train.beta1=1.5"),
    (["eval", "{root}/badtrain", "--no-speed"], '"train" must be an object'),
    (["eval", "{root}/badmodel", "--no-speed"], '"model" must be an object'),
    # an empty output path would silently mean the current directory
    (["train", "--out", "", "--data", "{root}/data", "--no-progress"], "--out"),
    (["data", "prepare", "--root", "", "--corpus", "{root}/noise.txt"], "--root"),
    # train: token files that do not match meta.json
    (["train", "--out", "{root}/new", "--data", "{root}/short", "--no-progress", "--set", *TINY], "records"),
    (
        ["train", "--out", "{root}/new", "--data", "{root}/odd", "--no-progress", "--set", *TINY],
        "whole number",
    ),
    (["data", "prepare", "--root", "{root}/afile"], "afile"),
    (["data", "prepare", "--corpus", "{root}/noise.txt", "--root", "{root}/dr"], "binary file"),
    (["data", "prepare", "--tokenizer", "banana", "--root", "{root}/dr"], "unknown tokenizer"),
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
        # new_cache and kv_cache_bytes take the same sizes and dtypes, and refuse the same ones
        (lambda m: m.new_cache(1, 8, dtype="float16"), "torch.dtype"),
        (lambda m: m.kv_cache_bytes(1, 8, dtype="float16"), "torch.dtype"),
        (lambda m: m.kv_cache_bytes(1, 8, dtype=torch.int32), "floating"),
        (lambda m: m.new_cache(1.5, 8), "batch_size=1.5"),
        (lambda m: m.new_cache("2", 8), "batch_size='2'"),
        (lambda m: m.new_cache(None, 8), "batch_size=None"),
        (lambda m: m.new_cache(True, 8), "batch_size=True"),
        (lambda m: m.new_cache(1, 1.5), "max_len=1.5"),
        (lambda m: m.new_cache(1, 8, device="banana"), "banana"),
        pytest.param(
            lambda m: m.new_cache(1, 8, device="cuda"),
            "CUDA",
            marks=pytest.mark.skipif(not NO_CUDA, reason="GPU"),
        ),
        # forward: ids the embedding cannot take, a cache that is not a KVCache
        (lambda m: m(torch.tensor([[1, 2]], dtype=torch.uint8)), "torch.uint8"),
        (lambda m: m(torch.tensor([[1, 2]], dtype=torch.int16)), "torch.int16"),
        (lambda m: m(torch.tensor([[1, 2]]), cache={}), "KVCache"),
        # configs: a dict where a ModelConfig belongs, unknown fields (TypeError from the dataclass)
        (lambda m: GPT({"n_layer": 1}), "ModelConfig"),
        (lambda m: _model_config(foo=1), "foo"),
        (lambda m: _train_config(foo=1), "foo"),
        # generate: every option checked once, before the prefill
        (lambda m: generate(m, torch.tensor([[1, 2]]), 0), "max_new_tokens"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), 1.5), "max_new_tokens"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), 2, temperature=float("nan")), "temperature"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), 2, temperature=-1), "temperature"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), 2, temperature=1.0, top_k=0), "top_k"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), 2, temperature=1.0, top_k=-1), "top_k"),
        (lambda m: generate(m, torch.tensor([1, 2]), 2), "(B, T)"),
        (lambda m: generate(m, [[1, 2], []], 2), "prompt 1 must be a non-empty 1-D"),
        (lambda m: generate(m, [[1, 2], [0.5]], 2), "prompt 1 must be a non-empty 1-D"),
        (lambda m: generate(m, [torch.tensor([[1, 2]])], 2), "prompt 0 must be a non-empty 1-D"),
        (lambda m: generate(m, [[1, 2], [3, 10**6]], 2), "outside the model's vocabulary"),
        (lambda m: generate(m, [], 2), "non-empty list"),
        (lambda m: generate(m, [["a"]], 2), "prompt 0 is not a sequence of token ids"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), 2, eos_token=9999), "eos_token"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), 2, eos_token=-1), "eos_token"),
        (lambda m: generate(m, torch.tensor([[1, 99]]), 2), "token id 99"),
    ],
)
def test_python_api_raises_kvlab_errors(call, needle):
    model = GPT(_model_config())
    with pytest.raises(KvlabError) as e:
        call(model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _model_config(**overrides):
    from kvlab import ModelConfig

    fields = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64, attention="gqa")
    return ModelConfig(**{**fields, **overrides})


def _train_config(**overrides):
    from kvlab.config import TrainConfig

    return TrainConfig(**overrides)


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"compile": "maybe"}, "train.compile"),
        ({"tensorboard": 1}, "train.tensorboard"),
        ({"device": "banana"}, "banana"),
        ({"device": 3}, "train.device"),
        ({"beta1": 1.5}, "train.beta1"),
        ({"beta2": -0.5}, "train.beta2"),
        ({"beta1": 1.0}, "train.beta1"),
        ({"lr": "abc"}, "train.lr"),
        ({"lr": 0}, "train.lr"),
        ({"lr": float("nan")}, "train.lr"),
        ({"lr": float("inf")}, "train.lr"),
        ({"lr": True}, "train.lr"),
        ({"weight_decay": -1}, "train.weight_decay"),
        ({"grad_clip": -1}, "train.grad_clip"),
        ({"max_iters": 0}, "train.max_iters"),
        ({"max_iters": 1.5}, "train.max_iters"),
        ({"eval_interval": 0}, "train.eval_interval"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"warmup_frac": "x"}, "train.warmup_frac"),
        ({"min_lr": "x"}, "train.min_lr"),
        ({"seed": 1.5}, "train.seed"),
        ({"dtype": 3}, "train.dtype"),
    ],
)
def test_train_config_validates_every_field(fields, needle):
    """TrainConfig.from_dict (the CLI, bench suites, uptrain) refuses values the loop or AdamW cannot use."""
    from kvlab.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(fields)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert TrainConfig.from_dict({"lr": 1, "min_lr": None, "beta1": 0, "device": "cuda:1"}).lr == 1  # valid


@pytest.mark.parametrize("device, needle", [("banana", "not a device"), ("cuda", "CUDA")])
def test_load_model_names_a_device_that_is_not_here(device, needle, world):
    from kvlab.checkpoint import load_model

    if device == "cuda" and not NO_CUDA:
        pytest.skip("this machine has a GPU")
    with pytest.raises(KvlabError, match=needle) as e:
        load_model(world / "run", device=device)
    assert "corrupt" not in str(e.value)


def test_token_id_check_does_not_break_the_compiled_graph():
    """train.compile=true: the eager range check (a data-dependent int()) is skipped while dynamo traces,
    so a compiled forward is one graph; outside compile it still refuses bad ids."""
    model = GPT(_model_config())
    try:
        explained = torch._dynamo.explain(model)(torch.zeros(1, 4, dtype=torch.long))
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    with pytest.raises(KvlabError, match="token id 64"):
        model(torch.tensor([[1, 64]]))


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
    # write_resume_state(path, state) writes resume.pt, write_weights(path, state) model.safetensors
    name = "write_resume_state" if target == "resume state" else "write_weights"
    real = getattr(ckpt, name)

    def flaky(*args):
        calls.append(1)
        return _disk_full(args[0]) if len(calls) > 1 else real(*args)  # the 2nd checkpoint: disk full

    monkeypatch.setattr(ckpt, name, flaky)
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


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A real small filesystem at `path` (root only); the test skips where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
    except OSError as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()[:100]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(fs: Path, leave: int) -> Path:
    """Fill the filesystem at fs until about `leave` bytes are free."""
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    filler = fs / "filler"
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("target", ["resume state", "weights"])
def test_a_really_full_disk_during_a_checkpoint_keeps_the_previous_one(target, world, tmp_path, capsys):
    """As the faked test above, on a real 6 MB tmpfs that fills while the step-4 checkpoint is written:
    torch.save's own failure (a RuntimeError for a path) must still read as the disk-full line."""
    from kvlab.checkpoint import load_model, safetensors_bytes
    from kvlab.train import checkpointing as ckpt

    with _tmpfs(tmp_path / "fs", "6m") as fs:
        run = fs / "run"
        real_write = ckpt.write_weights
        calls = []

        def fill_then_write(path, state):  # the 2nd checkpoint finds the disk (nearly) full
            calls.append(1)
            if len(calls) == 2:  # leave room for the weights only, or for nothing
                size = len(safetensors_bytes(state, metadata={"format": "pt"}))
                _fill(fs, leave=size + 8192 if target == "resume state" else 0)
            return real_write(path, state)

        ckpt.write_weights = fill_then_write
        try:
            capsys.readouterr()
            assert main(_train_argv(run, world / "data", "train.max_iters=4")) == 2
        finally:
            ckpt.write_weights = real_write
        err = capsys.readouterr().err.strip()
        assert err.startswith("kvlab: error: disk full while writing the checkpoint of step 4"), err
        assert "step 2 is intact" in err and "\n" not in err, err
        assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp left
        assert [m["step"] for m in ckpt.read_metrics(run)] == [2] and ckpt.load_resume_state(run)["step"] == 2
        load_model(run)
        (fs / "filler").unlink()  # space freed: the run goes on from step 2
        assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
        assert [m["step"] for m in ckpt.read_metrics(run)] == [2, 4]


def _corpus_text(seed: int) -> str:
    """Paragraphs of made-up words; another seed gives other words, so a BPE trained on it merges others."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 7))) for _ in range(120)]
    return "\n\n".join(" ".join(rng.choice(words, size=80)) for _ in range(40)) + "\n"


@pytest.fixture(scope="module")
def bpe_world(tmp_path_factory):
    """Two datasets tokenized by two different `bpe-300`s, and a run trained on the first."""
    from kvlab.data import dataset_dir

    root = tmp_path_factory.mktemp("bpe")
    for name, seed in (("a", 0), ("b", 1)):
        (root / f"{name}.txt").write_text(_corpus_text(seed))
        argv = ["data", "prepare", "--corpus", str(root / f"{name}.txt"), "--tokenizer", "bpe-300"]
        assert main([*argv, "--root", str(root / "data")]) == 0
    a, b = (dataset_dir(root / f"{n}.txt", "bpe-300", root / "data") for n in ("a", "b"))
    assert main(_train_argv(root / "run", a)) == 0
    return root, a, b


def test_heldout_data_of_another_tokenizer_with_the_same_name_is_refused(bpe_world, capsys):
    root, a, b = bpe_world
    capsys.readouterr()
    assert (
        main(["eval", str(root / "run"), "--no-speed", "--limit", "2", "--heldout", str(a)]) == 0
    )  # its own
    before = _snapshot(root)
    capsys.readouterr()
    assert main(["eval", str(root / "run"), "--no-speed", "--heldout", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: ") and "\n" not in err, err
    assert "a different bpe-300 than the run's" in err, err
    assert _snapshot(root) == before


def test_a_dataset_retokenized_after_training_is_refused_on_resume_and_eval(bpe_world, tmp_path, capsys):
    """The same dataset directory (same corpus path, same tokenizer name) prepared again from other text:
    its ids mean other strings, so --resume and eval of the run's own held-out split name the tokenizer."""
    from kvlab.data import dataset_dir

    root, _, _ = bpe_world
    (tmp_path / "c.txt").write_text(_corpus_text(2))
    prepare = ["data", "prepare", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", "bpe-300"]
    assert main([*prepare, "--root", str(tmp_path / "data")]) == 0
    data = dataset_dir(tmp_path / "c.txt", "bpe-300", tmp_path / "data")
    run = tmp_path / "run"
    assert main(_train_argv(run, data)) == 0
    (tmp_path / "c.txt").write_text(_corpus_text(3))
    assert main([*prepare, "--root", str(tmp_path / "data"), "--force"]) == 0
    before = _snapshot(tmp_path)
    for argv, needle in (
        (["train", "--out", str(run), "--resume", "--no-progress"], "data.tokenizer ('bpe-300' -> another"),
        (["eval", str(run), "--no-speed"], "the run's dataset"),
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kvlab: error: ") and "\n" not in err and needle in err, err
    assert _snapshot(tmp_path) == before


def test_data_prepare_on_a_full_disk_is_one_line_and_leaves_no_partial_dataset(bpe_world, tmp_path, capsys):
    """A real 1 MB tmpfs with room for the tokenizer files but not the token files (numpy's tofile said
    only "N requested and 0 written", with no errno and no path)."""
    root, a, _ = bpe_world
    tokenizer_bytes = sum((a / n).stat().st_size for n in ("tokenizer.json", "tokenizer_meta.json"))
    with _tmpfs(tmp_path / "fs", "1m") as fs:
        (fs / "data" / "datasets").mkdir(parents=True)
        _fill(fs, leave=tokenizer_bytes + 3 * 4096)
        capsys.readouterr()
        argv = ["data", "prepare", "--corpus", str(root / "a.txt"), "--tokenizer", "bpe-300"]
        assert main([*argv, "--root", str(fs / "data")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kvlab: error: cannot write ") and "\n" not in err, err
        assert "the disk is full" in err and "bpe-300" in err, err  # names the dataset directory
        assert list((fs / "data" / "datasets").iterdir()) == []  # no .partial folder


def test_data_prepare_failure_without_a_filename_names_the_dataset(bpe_world, tmp_path, monkeypatch, capsys):
    import kvlab.data.tokenfiles as tokenfiles

    root, _, _ = bpe_world

    def full(path, *args):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")  # no filename, as numpy/Rust writers give

    monkeypatch.setattr(tokenfiles, "_write_split", full)
    capsys.readouterr()
    argv = ["data", "prepare", "--corpus", str(root / "a.txt"), "--tokenizer", "bpe-300"]
    assert main([*argv, "--root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: cannot write ") and "the disk is full" in err and "\n" not in err
    assert list((tmp_path / "data" / "datasets").iterdir()) == []


def test_a_resume_with_nothing_to_resume_prepares_no_data(tmp_path, monkeypatch, capsys):
    """No --data and no run: the refusal comes before a corpus is fetched or a tokenizer trained."""
    import kvlab.data

    monkeypatch.setattr(kvlab.data, "prepare", lambda *a, **k: pytest.fail("prepared data for nothing"))
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "nonexistent"), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: ") and "nothing to resume" in err and "\n" not in err, err
    assert not (tmp_path / "nonexistent").exists()


def test_a_refused_resume_removes_stale_temp_files(world, tmp_path, capsys):
    run = tmp_path / "nockpt"
    shutil.copytree(world / "nockpt", run)
    before = _snapshot(run)
    stale = run / ".step-00000002.999.tmp"  # a run killed while writing its first checkpoint
    stale.mkdir()
    (stale / "resume.pt").write_bytes(b"\0" * 100)
    (run / ".checkpoint.999.tmp").symlink_to("step-00000002")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: ") and "nothing to resume" in err and "\n" not in err, err
    assert _snapshot(run) == before  # the temp files are gone, everything else is as it was


def test_resume_repeating_the_starting_flags_is_accepted(world, tmp_path, capsys):
    """--preset/--attention that describe the run (the command that started it, with --resume) are fine."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run, symlinks=True)
    argv = ["train", "--out", str(run), "--resume", "--preset", "cpu-tiny", "--attention", "mha"]
    assert main([*argv, "--no-progress", "--set", *TINY]) == 0
