"""Training loop: LR schedule, decay groups, learning, resume after SIGKILL, NaN stop, vocab, CLI errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kvlab import GPT, ModelConfig
from kvlab.checkpoint import load_model
from kvlab.cli import main
from kvlab.config import ConfigError, TrainConfig
from kvlab.errors import KvlabError
from kvlab.train import (
    LossTerm,
    TrainingDiverged,
    cross_entropy,
    distillation_terms,
    lr_at,
    param_groups,
    select_trainable,
    total_loss,
    train,
    train_preset,
)
from kvlab.train.checkpointing import load_resume_state, read_metrics
from kvlab.train.linear_ce import linear_cross_entropy
from kvlab.train.terms import default_terms, fused_cross_entropy_applies, micro_batch_loss

PATTERN_LEN = 23


def make_dataset(root: Path, vocab_size: int = 50, n_train: int = 6000, n_val: int = 1500, top=None) -> Path:
    """A repeated random pattern (learnable to ~0 loss) as nanoGPT token files + meta.json."""
    root.mkdir(parents=True, exist_ok=True)
    pattern = np.random.default_rng(0).integers(0, vocab_size, size=PATTERN_LEN)
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = np.tile(pattern, n // PATTERN_LEN + 1)[:n].astype(np.uint16)
        if top is not None:
            tokens[5] = top
        tokens.tofile(root / f"{split}.bin")
    meta = {
        "vocab_size": vocab_size,
        "dtype": "uint16",
        "tokenizer": "test",
        "eot_token": 0,
        "unigram_entropy": math.log(PATTERN_LEN),
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def tiny_model(**overrides) -> ModelConfig:
    fields = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64, attention="gqa")
    return ModelConfig(**{**fields, **overrides})


def tiny_train(**overrides) -> TrainConfig:
    fields = dict(
        max_iters=12,
        eval_interval=4,
        eval_iters=2,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        device="cpu",
        tensorboard=False,
    )
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the 2 shared cores are often busy: OpenMP spinning
    under contention made steps 10x slower. The SIGKILL subprocess uses the same count (bit-exactness)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


# ---- optimiser ---------------------------------------------------------------------------------
def test_lr_schedule_values():
    cfg = TrainConfig(max_iters=100, lr=1e-3)  # warmup 4 steps, cosine to 1e-4 at step 100
    assert cfg.warmup_iters == 4 and cfg.final_lr == pytest.approx(1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 5)
    assert lr_at(3, cfg) == pytest.approx(1e-3 * 4 / 5)
    assert lr_at(4, cfg) == pytest.approx(1e-3)
    assert lr_at(52, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the cosine
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    assert lr_at(99, cfg) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 95 / 96)))
    assert TrainConfig(max_iters=100, lr=1e-3, min_lr=0.0).final_lr == 0.0


def test_weight_decay_only_on_2d_parameters():
    model = GPT(tiny_model(bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = sorted(names[id(p)] for p in decay["params"])
    no_decay_names = sorted(names[id(p)] for p in no_decay["params"])
    assert decay_names == sorted(n for n, p in model.named_parameters() if p.dim() >= 2)
    assert "wte.weight" in decay_names and "blocks.0.mlp.c_fc.weight" in decay_names
    assert "blocks.0.ln_1.weight" in no_decay_names and "blocks.0.mlp.c_fc.bias" in no_decay_names
    assert all(p.dim() < 2 for p in no_decay["params"])
    n_all = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_all


def test_trainable_filter_freezes_the_rest():
    model = GPT(tiny_model())
    kept = select_trainable(model, ["blocks.1.attn"])
    assert kept and all(n.startswith("blocks.1.attn.") for n in kept)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "wte.weight" in frozen and len(frozen) + len(kept) == len(list(model.parameters()))
    decay, no_decay = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in (decay, no_decay)) == len(kept)
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_trainable(model, ["no_such_layer.*"])


# ---- loss terms --------------------------------------------------------------------------------
def test_distillation_terms_weight_kl_and_ce():
    torch.manual_seed(0)
    student, teacher = GPT(tiny_model()), GPT(tiny_model())
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    logits = student(idx)
    loss, logged = total_loss(distillation_terms(teacher), student, idx, targets, logits)
    p_t = torch.softmax(teacher(idx), -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits, -1))).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(logged["kl"], kl.detach())
    torch.testing.assert_close(loss, 0.25 * kl + 0.75 * ce)
    self_loss, self_logged = total_loss(distillation_terms(student), student, idx, targets, logits)
    assert self_logged["kl"].abs().item() < 1e-6  # KL of a model to itself is zero
    torch.testing.assert_close(self_loss, 0.75 * ce, rtol=0, atol=1e-6)  # ... so only the CE part is left


@pytest.mark.parametrize("n, vocab", [(2048, 8192), (37, 97), (300, 50)])  # one chunk or many
def test_linear_cross_entropy_equals_logits_cross_entropy(n, vocab):
    """The fused LM-head loss: same value, same gradients for h and W, as F.cross_entropy of h @ W^T
    (also through a weight on the loss, and with W frozen)."""
    h = torch.randn(n, 24, requires_grad=True)
    w = (torch.randn(vocab, 24) * 0.3).requires_grad_()
    y = torch.randint(0, vocab, (n,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y)
    (0.75 * ref).backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused = linear_cross_entropy(h, w, y)
    (0.75 * fused).backward()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_grads[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(w.grad, ref_grads[1], rtol=1e-5, atol=1e-8)
    h.grad = None
    linear_cross_entropy(h, w.detach(), y).backward()
    torch.testing.assert_close(h.grad, ref_grads[0] / 0.75, rtol=1e-5, atol=1e-8)


def test_fused_micro_batch_loss_equals_the_logits_path():
    """What the loop runs on CPU float32 (the fused path) gives the loss and gradients of model(x) + CE,
    tied embeddings included; other terms, autocast and GPUs keep the logits path."""
    torch.manual_seed(0)
    model = GPT(tiny_model(bias=True)).train()
    idx, targets = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 20))
    terms = default_terms()
    assert fused_cross_entropy_applies(terms, model, torch.device("cpu"), "float32")
    assert not fused_cross_entropy_applies(terms, model, torch.device("cpu"), "bfloat16")
    assert not fused_cross_entropy_applies(distillation_terms(GPT(tiny_model())), model, "cpu", "float32")
    losses, grads = [], []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss = micro_batch_loss(model, model, terms, idx, targets, fused)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


# ---- the loop ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pattern_run(data_dir, tmp_path_factory) -> Path:
    cfg = tiny_train(max_iters=40, eval_interval=20, eval_iters=2, batch_size=8, grad_accum=1, lr=1e-2)
    return train(tiny_model(), cfg, data_dir, tmp_path_factory.mktemp("run") / "pattern", progress=False)


def test_loss_falls_on_repeated_pattern(pattern_run, data_dir):
    metrics = read_metrics(pattern_run)
    assert [m["step"] for m in metrics] == [20, 40]
    assert metrics[-1]["val_loss"] < 0.5 < math.log(50)  # a memorisable pattern; chance is ln(50) = 3.9
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    model = load_model(pattern_run)  # the saved weights reproduce the low loss on the pattern
    seq = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16)[:33].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(seq[:, :-1])
    assert torch.nn.functional.cross_entropy(logits[0, PATTERN_LEN:], seq[0, PATTERN_LEN + 1 :]) < 0.5


def test_metrics_jsonl_and_run_dir(pattern_run):
    metrics = read_metrics(pattern_run)
    keys = {"step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}
    assert all(set(m) == keys for m in metrics)
    assert metrics[0]["tokens"] == 20 * 8 * 32 and metrics[1]["tokens"] == 40 * 8 * 32
    assert metrics[1]["lr"] == pytest.approx(lr_at(39, TrainConfig(max_iters=40, lr=1e-2)))
    assert metrics[0]["tokens_per_s"] > 0 and metrics[1]["elapsed_s"] > metrics[0]["elapsed_s"]
    config = json.loads((pattern_run / "config.json").read_text())
    assert config["train"]["max_iters"] == 40 and config["data"]["vocab_size"] == 50
    assert config["model"]["vocab_size"] == 64 and config["environment"]["torch"] == torch.__version__
    state = load_resume_state(pattern_run)
    assert state["step"] == 40 and state["val_loss"] == metrics[-1]["val_loss"]
    weights = load_file(pattern_run / "model.safetensors")
    torch.testing.assert_close(weights["wte.weight"], state["model"]["wte.weight"], rtol=0, atol=0)


KILL_SCRIPT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from kvlab.config import ModelConfig, TrainConfig
from kvlab.train import train
sys.path.insert(0, {test_dir!r})
from test_train import tiny_model, tiny_train, dropout_hook
calls = []
def kill_after_checkpoint(model, gen):
    calls.append(1)
    if len(calls) == 7:  # before step 7: the checkpoint of step 4 is on disk, steps 5-6 are lost
        os.kill(os.getpid(), signal.SIGKILL)
train(tiny_model(dropout=0.1), tiny_train(), {data!r}, {out!r}, progress=False,
      hooks=[dropout_hook, kill_after_checkpoint])
"""


def dropout_hook(model, gen):
    """Uses the hook generator and the torch RNG (dropout), so resume must restore both."""
    model.drop.p = float(torch.rand((), generator=gen)) * 0.2


@pytest.mark.slow  # a subprocess importing torch: ~5 s idle, more on busy cores
def test_resume_after_sigkill_is_bit_identical(data_dir, tmp_path):
    full = train(
        tiny_model(dropout=0.1),
        tiny_train(),
        data_dir,
        tmp_path / "full",
        progress=False,
        hooks=[dropout_hook],
    )
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(test_dir=str(Path(__file__).parent), data=str(data_dir), out=str(killed))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_resume_state(killed)["step"] == 4 and [m["step"] for m in read_metrics(killed)] == [4]
    train(
        tiny_model(dropout=0.1),
        tiny_train(),
        data_dir,
        killed,
        resume=True,
        progress=False,
        hooks=[dropout_hook],
    )
    a, b = read_metrics(full), read_metrics(killed)
    assert [m["step"] for m in b] == [4, 8, 12]
    for ma, mb in zip(a, b):
        assert (ma["val_loss"], ma["train_loss"], ma["lr"]) == (mb["val_loss"], mb["train_loss"], mb["lr"])
    wa, wb = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path):
    calls = []

    def poisoned_ce(model, idx, targets, logits):
        calls.append(1)
        loss, logged = cross_entropy(model, idx, targets, logits)
        return (loss * float("nan") if len(calls) > 14 else loss), logged  # step 8's 2nd micro-batch

    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"train loss became nan at step 8.*intact") as e:
        train(
            tiny_model(),
            tiny_train(),
            data_dir,
            run,
            loss_terms=[LossTerm("ce", poisoned_ce)],
            progress=False,
        )
    assert "\n" not in str(e.value)
    state = load_resume_state(run)
    assert state["step"] == 4 and [m["step"] for m in read_metrics(run)] == [4]
    model = load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.testing.assert_close(model.wte.weight, state["model"]["wte.weight"], rtol=0, atol=0)


def test_vocab_from_data_and_mismatch_errors(data_dir, tmp_path):
    run = train(
        tiny_model(vocab_size=8192),
        tiny_train(max_iters=1, eval_interval=1, eval_iters=1),
        data_dir,
        tmp_path / "v",
        progress=False,
    )
    assert load_model(run).config.vocab_size == 64  # the data's 50 tokens padded to a multiple of 64
    big = make_dataset(tmp_path / "big", vocab_size=200)
    with pytest.raises(KvlabError, match=r"vocabulary \(200 tokens.*vocab_size=64"):
        train(None, tiny_train(), big, tmp_path / "w", init_from=run, progress=False)
    bad = make_dataset(tmp_path / "bad", vocab_size=50, top=60)
    with pytest.raises(KvlabError, match=r"train.bin holds token id 60 .*vocab_size=50"):
        train(tiny_model(), tiny_train(), bad, tmp_path / "x", progress=False)


def test_init_from_and_trainable(data_dir, pattern_run, tmp_path):
    run = train(
        None,
        tiny_train(max_iters=2, eval_interval=2),
        data_dir,
        tmp_path / "ft",
        init_from=pattern_run,
        trainable=["blocks.1.attn"],
        progress=False,
    )
    before, after = load_model(pattern_run), load_model(run)
    torch.testing.assert_close(after.wte.weight, before.wte.weight, rtol=0, atol=0)  # frozen
    torch.testing.assert_close(
        after.blocks[0].attn.state_dict(), before.blocks[0].attn.state_dict(), rtol=0, atol=0
    )
    moved = [
        not torch.equal(a, b)
        for a, b in zip(after.blocks[1].attn.parameters(), before.blocks[1].attn.parameters())
    ]
    assert all(moved)  # every trainable tensor took steps


@pytest.mark.slow  # torch.compile of a training forward and backward
def test_compiled_training_is_one_graph_with_rope_and_a_rank_sampler(data_dir, tmp_path):
    """train.compile=true on a Llama-family Matryoshka model whose ranks seed 003's sampler draws every
    step: the forward compiles once. The RoPE tables are built before it (one built inside the first
    compiled call recompiled the second), and the ranks reach the graph as a tensor, not as constants."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from kvlab.attention.matryoshka import RankSampler

    cfg = tiny_model(family="llama", attention="matryoshka-8", bias=False)
    target = {"k": [[8] * 4] * 2, "v": [[8] * 4] * 2}
    torch._dynamo.reset()
    counters.clear()
    run = train(cfg, tiny_train(max_iters=4, eval_interval=4, compile=True), data_dir, tmp_path / "c",
                hooks=[RankSampler(target, choices=[2, 4, 6, 8])], progress=False)  # fmt: skip
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert math.isfinite(read_metrics(run)[-1]["val_loss"])


# ---- presets and CLI ---------------------------------------------------------------------------
def test_train_presets():
    g = train_preset("gpt2-124m")
    assert (g.max_iters, g.batch_size, g.grad_accum, g.lr) == (5000, 12, 5, 6e-4)
    assert g.batch_size * g.grad_accum * 1024 * g.max_iters == 307_200_000
    assert train_preset("cpu-tiny", max_iters=7).max_iters == 7
    with pytest.raises(ConfigError, match="no training preset"):
        train_preset("nope")


def test_cli_train_and_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    sets = [
        "train.max_iters=4",
        "train.eval_interval=2",
        "train.eval_iters=1",
        "train.batch_size=2",
        "train.grad_accum=1",
        "model.n_layer=2",
        "model.n_embd=32",
        "model.n_head=4",
        "model.block_size=32",
        "attention.n_kv_heads=1",
        "train.device=cpu",
    ]
    args = [
        "train",
        "--preset",
        "cpu-tiny",
        "--attention",
        "gqa",
        "--out",
        str(out),
        "--data",
        str(data_dir),
        "--no-progress",
        "--set",
        *sets,
    ]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["attention"]["n_kv_heads"] == 1 and config["train"]["max_iters"] == 4
    assert config["model"]["n_layer"] == 2 and [m["step"] for m in read_metrics(out)] == [2, 4]
    # --resume reads config.json; a longer budget continues from step 4
    assert (
        main(
            [
                "train",
                "--out",
                str(out),
                "--resume",
                "--no-progress",
                "--allow-config-change",
                "--set",
                "train.max_iters=6",
            ]
        )
        == 0
    )
    assert [m["step"] for m in read_metrics(out)] == [2, 4, 6]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing"], "meta.json does not exist; run `kvlab data prepare`"),
        (["--set", "lr=1"], "expected SECTION.KEY=VALUE"),
        (["--set", "train.bogus=1"], "unknown train field"),
        (["--set", "train.max_iters=0"], "train.max_iters=0 must be a positive integer"),
        (["--preset", "gpt9"], "unknown --preset"),
        (["--attention", "nope"], "unknown attention preset"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_cli_errors_are_one_line(args, message, data_dir, tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "r"), "--data", str(data_dir), "--no-progress"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error:") and message in err and "\n" not in err
