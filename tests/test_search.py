"""Greedy Matryoshka rank search (kvlab.search) and `kvlab search-ranks`: budget, preference for
signal-free heads, exact cache bytes, determinism, errors and the CLI end to end on a tiny run."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from kvlab import AttentionConfig
from kvlab.attention.matryoshka import get_ranks
from kvlab.checkpoint import load_model, read_config, save_model
from kvlab.cli import main
from kvlab.convert.matryoshka import pca_init_
from kvlab.errors import KvlabError
from kvlab.model import GPT
from kvlab.search import final_hidden, greedy_rank_search

from conftest import tiny_config

N_LAYER, H_KV, D = 2, 2, 16  # head_dim 16: default step 2


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = tiny_config(AttentionConfig(kind="matryoshka", n_kv_heads=H_KV), n_layer=N_LAYER, n_embd=64)
    return GPT(cfg).eval()


def _batches(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 24), generator=g) for _ in range(2)]


def _step_ratio(step: int = 2) -> float:
    """Ratio change of one step cut: step elements of one layer out of 2 * H_kv * D per layer."""
    return step / (N_LAYER * 2 * H_KV * D)


@pytest.mark.parametrize("budget", [0.4, 0.73])
def test_search_meets_budget_just_under(budget):
    model = _model()
    pca_init_(model, _batches(2))
    result = greedy_rank_search(model, _batches(), budget, fraction=0.25)
    assert result["full_kv_bytes_per_token"] == N_LAYER * 2 * H_KV * D * 2 / N_LAYER  # bf16, per layer avg
    assert budget - _step_ratio() < result["ratio"] <= budget
    assert result["kv_bytes_per_token"] == model.kv_metrics()["kv_bytes_per_token"]
    assert get_ranks(model)["k"] == result["k"] and get_ranks(model)["v"] == result["v"]
    ranks = [r for kv in ("k", "v") for layer in result[kv] for r in layer]
    assert min(ranks) >= 2 and all(r % 2 == 0 for r in ranks)
    assert result["rounds"] == len(result["history"]) > 0
    assert result["history"][-1]["ratio"] == result["ratio"]
    # Lowering ranks never improves the hidden states much; the error grows from zero.
    assert 0 < result["history"][0]["error"] <= result["history"][-1]["error"] == result["error"]


def test_budget_one_does_nothing():
    model = _model()
    result = greedy_rank_search(model, _batches(), 1.0)
    assert result["rounds"] == 0 and result["ratio"] == 1.0 and result["error"] == 0.0
    assert result["k"] == [[D] * H_KV] * N_LAYER


def test_prefers_signal_free_head():
    """A KV head whose K and V projections are zero carries nothing: every cut of it costs exactly 0 and
    the search must take all of them (down to the smallest rank) before touching any other head."""
    model = _model()
    layer, head = 1, 1
    with torch.no_grad():
        w, b = model.blocks[layer].attn.kv_proj.weight, model.blocks[layer].attn.kv_proj.bias
        for off in (0, H_KV * D):  # K rows, then V rows of `head`
            w[off + head * D : off + (head + 1) * D].zero_()
            b[off + head * D : off + (head + 1) * D].zero_()
    pca_init_(model, _batches(2))
    result = greedy_rank_search(model, _batches(), 0.5, fraction=1e-6)  # one cut per round
    cuts = [c for r in result["history"] for c in r["lowered"]]
    n_free = 2 * (D // 2 - 1)  # K and V from 16 down to 2 in steps of 2
    assert all((c["layer"], c["head"], c["error"]) == (layer, head, 0.0) for c in cuts[:n_free])
    assert all(c["error"] > 0 for c in cuts[n_free:]) and len(cuts) > n_free
    assert result["k"][layer][head] == 2 and result["v"][layer][head] == 2


def test_found_ranks_cache_bytes_and_cached_logits():
    model = _model()
    pca_init_(model, _batches(2))
    result = greedy_rank_search(model, _batches(), 0.45, fraction=0.3)
    cache = model.new_cache(3, 20, dtype=torch.bfloat16)
    assert cache.nbytes() == model.kv_cache_bytes(3, 20, torch.bfloat16)
    assert cache.nbytes() == 3 * 20 * result["kv_bytes_per_token"] * N_LAYER
    idx = _batches()[0][:, :20]
    full = model(idx)
    cache = model.new_cache(2, 20, dtype=torch.float32)
    cached = torch.cat([model(idx[:, :12], cache), model(idx[:, 12:], cache)], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_deterministic_and_starts_from_current_ranks():
    base = _model()
    pca_init_(base, _batches(2))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra, rb = greedy_rank_search(a, _batches(), 0.5), greedy_rank_search(b, _batches(), 0.5)
    assert ra == rb
    # Resuming from a found assignment toward a smaller budget keeps every rank at most where it was.
    rc = greedy_rank_search(a, _batches(), 0.3)
    assert all(x <= y for kv in ("k", "v") for lc, la in zip(rc[kv], ra[kv]) for x, y in zip(lc, la))
    assert rc["ratio"] <= 0.3


def test_final_hidden_is_ln_f_output():
    model = _model()
    idx = _batches()[0]
    h = final_hidden(model, idx)
    torch.testing.assert_close(model.lm_head(h), model(idx))


def test_errors():
    with pytest.raises(KvlabError, match="matryoshka"):
        greedy_rank_search(GPT(tiny_config("gqa")), _batches(), 0.5)
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(KvlabError, match="budget"):
            greedy_rank_search(_model(), _batches(), bad)
    with pytest.raises(KvlabError, match="smallest reachable ratio 0.125"):
        greedy_rank_search(_model(), _batches(), 0.1)  # floor: every rank at step 2 of 16
    with pytest.raises(KvlabError, match="calib_batches is empty"):
        greedy_rank_search(_model(), [], 0.5)
    with pytest.raises(KvlabError, match="step"):
        greedy_rank_search(_model(), _batches(), 0.5, step=0)


def _run_dir(tmp_path, attention="matryoshka"):
    """A saved random model plus a tiny dataset (meta.json + val.bin) its config points to."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 97, size=500).astype(np.uint16)
    tokens.tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"tokenizer": "test", "vocab_size": 97, "dtype": "uint16"}))
    model = _model() if attention == "matryoshka" else GPT(tiny_config(attention))
    run = tmp_path / "run"
    save_model(run, model, {"data": {"dir": str(data), "tokenizer": "test"}})
    return run, data


def test_cli_end_to_end(tmp_path, capsys):
    run, data = _run_dir(tmp_path)
    out = tmp_path / "searched"
    argv = ["search-ranks", str(run), "--budget", "0.5", "--calib-tokens", "128", "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "K ranks" in printed and "ratio 0.500" in printed and "kvlab eval" in printed
    saved = load_model(out)
    # The same search in the library, on the same windows (two of block_size 64 from the val split).
    model = load_model(run)
    windows = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16)[:128].astype(np.int64))
    expected = greedy_rank_search(model, [windows.view(2, 64)], 0.5)
    assert get_ranks(saved) == {k: expected[k] for k in ("layers", "k", "v")}
    assert saved.kv_metrics()["kv_bytes_per_token"] == expected["kv_bytes_per_token"]
    torch.testing.assert_close(saved(windows.view(2, 64)), model(windows.view(2, 64)))
    config = read_config(out)
    assert config["data"]["dir"] == str(data) and config["rank_search"]["ratio"] == expected["ratio"]
    assert config["model"]["attention"]["layers"]["1"]["k_ranks"] == expected["k"][1]


def test_cli_from_full_searches_down_from_full_rank(tmp_path, capsys):
    """A run saved at uniform rank 8 (of 16) is at 0.5 already: without --from-full the search starts there
    and changes nothing; with it the search starts from full rank, as MatryoshkaKV's does after training
    with sampled ranks, and finds the library's ranks for a full-rank start."""
    from kvlab.attention.matryoshka import set_ranks

    run, data = _run_dir(tmp_path)
    model = load_model(run)
    set_ranks(model, k=8, v=8)
    save_model(tmp_path / "r8", model, {"data": {"dir": str(data), "tokenizer": "test"}})
    argv = [
        "search-ranks",
        str(tmp_path / "r8"),
        "--budget",
        "0.5",
        "--calib-tokens",
        "128",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--out", str(tmp_path / "kept")]) == 0
    assert get_ranks(load_model(tmp_path / "kept"))["k"] == [[8, 8], [8, 8]]
    assert main([*argv, "--from-full", "--out", str(tmp_path / "full")]) == 0
    windows = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16)[:128].astype(np.int64))
    expected = greedy_rank_search(load_model(run), [windows.view(2, 64)], 0.5)  # saved at full rank
    found = get_ranks(load_model(tmp_path / "full"))
    assert found == {k: expected[k] for k in ("layers", "k", "v")}
    assert found["k"] != [[8, 8], [8, 8]] or found["v"] != [[8, 8], [8, 8]]
    capsys.readouterr()


def test_cli_errors(tmp_path, capsys):
    run, _ = _run_dir(tmp_path, attention="gqa")
    assert main(["search-ranks", str(run), "--budget", "0.5", "--device", "cpu"]) == 2
    assert "matryoshka" in capsys.readouterr().err
    assert main(["search-ranks", str(tmp_path / "nope"), "--budget", "0.5", "--device", "cpu"]) == 2


def _err_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, (out, err)
    return err.strip()


def test_cli_refuses_models_without_matryoshka_layers_saying_how_to_convert(tmp_path, capsys, monkeypatch):
    """An HF model (hf:DIR, a plain HF directory, a fetchable name) is never MatryoshkaKV: refused in one
    line before anything is fetched or loaded; a run of another structure likewise after loading."""
    import transformers

    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "data"))
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
        )  # fmt: skip
    )
    hf.save_pretrained(tmp_path / "llama")
    capsys.readouterr()
    for source, spec in [
        (f"hf:{tmp_path / 'llama'}", f"hf:{tmp_path / 'llama'}"),
        (str(tmp_path / "llama"), f"hf:{tmp_path / 'llama'}"),
        ("smollm2-135m", "smollm2-135m"),
    ]:
        assert main(["search-ranks", source, "--budget", "0.5", "--device", "cpu"]) == 2
        assert _err_line(capsys) == (
            f"kvlab: error: {source} is a Hugging Face model, with no MatryoshkaKV projections to search; "
            f"convert it first with `kvlab uptrain --from {spec} --to matryoshka --data DATA --out RUN` (or "
            "kvlab.convert.matryoshka.to_matryoshka) and search that run"
        )
    assert not (tmp_path / "data").exists()  # smollm2-135m was not fetched just to be refused
    run, _ = _run_dir(tmp_path, attention="gqa")
    assert main(["search-ranks", str(run), "--budget", "0.5", "--device", "cpu"]) == 2
    assert f"{run} is a gqa model, with no MatryoshkaKV projections" in _err_line(capsys)


def test_cli_calibration_data_must_exist_and_fit_the_run(tmp_path, capsys):
    run, data = _run_dir(tmp_path)
    model = load_model(run)
    bare = tmp_path / "bare"  # a Matryoshka model saved without a dataset (e.g. from to_matryoshka)
    save_model(bare, model)
    assert main(["search-ranks", str(bare), "--budget", "0.5", "--device", "cpu"]) == 2
    assert "names no dataset (data.dir); pass --data DATASET_DIR" in _err_line(capsys)
    assert main(["search-ranks", str(bare), "--budget", "0.5", "--data", str(tmp_path / "nope")]) == 2
    assert "dataset " + str(tmp_path / "nope") + " does not exist" in _err_line(capsys)
    other = tmp_path / "other"  # made with another tokenizer than the run's
    other.mkdir()
    (data / "val.bin").rename(other / "val.bin")
    (other / "meta.json").write_text(
        json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"})
    )
    assert main(["search-ranks", str(run), "--budget", "0.5", "--data", str(other), "--device", "cpu"]) == 2
    err = _err_line(capsys)
    assert (
        f"--data {other}: token files were made with tokenizer gpt2" in err and "uses tokenizer test" in err
    )
    assert main(["search-ranks", str(bare), "--budget", "0.5", "--data", str(other), "--device", "cpu"]) == 2
    assert "model has vocab_size 97" in _err_line(capsys)  # no recorded tokenizer: the vocabulary must fit
