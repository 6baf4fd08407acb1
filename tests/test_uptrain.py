"""`kvlab uptrain` on a tiny trained source: every structure and recipe lowers held-out loss below its
step-0 value, the control sits in the same table, resume crosses the OACD phase boundary, bad input is one
line and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab.checkpoint import load_model, save_model
from kvlab.cli import main
from kvlab.config import ModelConfig
from kvlab.model import GPT
from kvlab.retrofit.structures import convert
from kvlab.train import train
from test_train import make_dataset, tiny_train

TRAIN_SETS = [
    "train.max_iters=16", "train.eval_interval=8", "train.eval_iters=2", "train.batch_size=4",
    "train.grad_accum=1", "train.device=cpu", "train.tensorboard=false",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A briefly trained Llama-family MHA model (RoPE, 4 heads of 8) and its data."""
    root = tmp_path_factory.mktemp("uptrain")
    data = make_dataset(root / "data")
    cfg = ModelConfig(
        family="llama", n_layer=2, n_head=4, n_embd=32, intermediate_size=48, block_size=32,
        vocab_size=64, attention="mha",
    )  # fmt: skip
    run = train(cfg, tiny_train(max_iters=20, eval_interval=20, lr=3e-3), data, root / "src", progress=False)
    return run, data, root


def _uptrain(source, out, to, *extra):
    run, data, root = source
    argv = ["uptrain", "--from", str(run), "--to", to, "--data", str(data), "--out", str(root / out)]
    return main([*argv, "--no-progress", "--set", *TRAIN_SETS, *extra])


@pytest.mark.parametrize(
    "to,recipe",
    [
        ("gqa:1", "ce"),
        ("share:every:2", "ce"),
        ("mla:24:4", "ce"),
        ("matryoshka:4", "distill"),
        ("context:0", "oacd"),
    ],
)
def test_uptrain_lowers_heldout_loss_below_step0(source, capsys, to, recipe):
    out = f"up-{to.replace(':', '-')}"
    assert _uptrain(source, out, to, "--recipe", recipe, "--phase1-iters", "4") == 0
    summary = json.loads((source[2] / out / "uptrain.json").read_text())
    reduced = summary["reduced"]
    assert reduced["final_loss"] < reduced["step0_loss"]
    assert reduced["kv_bytes_per_token"] < 128  # MHA: 2 x 4 heads x 8 dims x 2 bytes
    config = json.loads((source[2] / out / "config.json").read_text())
    assert config["uptrain"]["structure"] == to and config["uptrain"]["source"].startswith("run:")
    assert to in capsys.readouterr().out


def test_control_in_the_same_table_and_step0_of_noop(source, capsys):
    assert _uptrain(source, "up-ctl", "gqa:2", "--control") == 0
    summary = json.loads((source[2] / "up-ctl" / "uptrain.json").read_text())
    ctl = summary["control"]
    assert ctl["kv_bytes_per_token"] == 128 and ctl["step0_loss"] == pytest.approx(summary["source_loss"])
    assert ctl["final_loss"] < ctl["step0_loss"]
    table = capsys.readouterr().out
    assert "gqa:2" in table and "control (unreduced)" in table
    # A structure that keeps everything starts exactly where the source is.
    noop = convert(load_model(source[0]), "mla:32:8:svd", [])
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(noop(idx), load_model(source[0])(idx), rtol=1e-5, atol=1e-5)


def test_oacd_resumes_across_the_phase_boundary(source):
    root = source[2]
    assert _uptrain(source, "up-oacd", "context:0", "--recipe", "oacd", "--phase1-iters", "4") == 0
    first = (root / "up-oacd" / "metrics.jsonl").read_text()
    assert (root / "up-oacd" / "phase1" / "metrics.jsonl").is_file()
    # Rerunning with --resume after completion retrains nothing and keeps the records.
    assert (
        _uptrain(source, "up-oacd", "context:0", "--recipe", "oacd", "--phase1-iters", "4", "--resume") == 0
    )
    assert (root / "up-oacd" / "metrics.jsonl").read_text() == first


def test_search_after_training_is_matryoshkakv_order(source, capsys):
    """--search-after: the structure before the search trains (full rank, sampled ranks), then the search
    runs on the trained model from full rank into OUT/searched, which the summary scores; step 0 scores the
    search at conversion. Without a final search step it is one line and nothing is written."""
    to = "matryoshka+search:0.5:0.5"
    assert _uptrain(source, "up-after", to, "--recipe", "distill", "--search-after") == 0
    root = source[2] / "up-after"
    summary = json.loads((root / "uptrain.json").read_text())
    reduced = summary["reduced"]
    assert summary["search_after"] and reduced["run_dir"] == str(root / "searched")
    searched, trained = load_model(root / "searched"), load_model(root)
    assert trained.kv_metrics()["kv_bytes_per_token"] == 128  # the training run stays at full rank
    assert reduced["kv_bytes_per_token"] == searched.kv_metrics()["kv_bytes_per_token"] <= 64
    assert reduced["final_loss"] < reduced["step0_loss"] and "trained_loss" in reduced
    assert json.loads((root / "searched" / "config.json").read_text())["uptrain"]["searched_after_training"]
    assert "(searched after training)" in capsys.readouterr().out
    assert _uptrain(source, "bad-after", "matryoshka:4", "--recipe", "distill", "--search-after") == 2
    err = capsys.readouterr().err.strip()
    assert "searching after training needs" in err and "\n" not in err
    assert not (source[2] / "bad-after").exists()


@pytest.mark.parametrize(
    "to,words",
    [
        ("gqa:3", "n_kv_heads=3 must divide"),
        ("matryoshka:9", "between 1 and head_dim=8"),
        ("context:5", "out of range"),
        ("mla:999", "kv_rank=999 must be between"),
        ("nonsense:1", "unknown step"),
        ("mqa:7", "mqa takes no options"),
        ("gqa:2+none:1", "none takes no options"),
    ],
)
def test_bad_structures_one_line_nothing_written(source, capsys, to, words):
    assert _uptrain(source, "bad", to) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not (source[2] / "bad").exists()


def test_data_from_another_tokenizer_is_refused(source, capsys):
    run, _, root = source
    other = make_dataset(root / "other-data")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": "bpe-8k"}))
    argv = ["uptrain", "--from", str(run), "--to", "gqa:2", "--data", str(other), "--out", str(root / "bad2")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenized with 'bpe-8k'" in err and "'test'" in err
    assert not (root / "bad2").exists()


def test_teacher_that_does_not_match_is_refused(source, tmp_path, capsys):
    run, data, root = source
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=32, block_size=32, vocab_size=128, attention="mha")
    save_model(tmp_path / "t", GPT(cfg))  # another vocabulary than the student's
    argv = ["uptrain", "--from", str(run), "--to", "matryoshka:4", "--recipe", "distill", "--data", str(data)]
    argv += ["--set", *TRAIN_SETS]
    assert main([*argv, "--out", str(root / "bad3"), "--teacher", str(tmp_path / "t")]) == 2
    assert "teacher's vocab_size=128" in capsys.readouterr().err
    assert not (root / "bad3").exists()


def test_empty_out_is_refused_before_anything_runs(source, capsys, tmp_path, monkeypatch):
    run, data, _ = source
    monkeypatch.chdir(tmp_path)
    argv = ["uptrain", "--from", str(run), "--to", "mqa", "--data", str(data), "--out", ""]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out '' is empty" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []
