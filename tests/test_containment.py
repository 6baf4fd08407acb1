"""Contained runs of attention files: hostile files that pass validation end with a clear verdict and leave
everything outside their run directory as it was; a good file trains and is scored."""

from __future__ import annotations

import hashlib
import json
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from kvlab import ModelConfig
from kvlab.cli import main
from kvlab.harness.contain import Limits, _verdict, disk_use, run_contained
from kvlab.harness.landlock import abi_version
from kvlab.harness.template import template_text
from kvlab.harness.validate import validate_file

CFG = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64)
LIMITS = Limits(cpu_s=120, wall_s=120, memory_bytes=4 << 30)
FORWARD = "    def forward(self, x, state=None, pos=0):\n"


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def world(tmp_path):
    """outside/: files a hostile run must not touch; runs/: where the runs go."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("untouched\n")
    return tmp_path, outside


def hostile(tmp_path: Path, body: str, name: str = "hostile.py") -> Path:
    """The mha fill with `body` run first in forward; it must pass validation (the point of the test)."""
    text = template_text("mha")
    assert text.count(FORWARD) == 1
    path = tmp_path / name
    path.write_text(text.replace(FORWARD, FORWARD + body))
    assert validate_file(path) == []
    return path


def run(tmp_path, path, limits=LIMITS, **kw):
    return run_contained(path, tmp_path / "runs" / path.stem, CFG, limits, measure=False, **kw)


def assert_untouched(tmp_path, outside, before, path):
    assert snapshot(outside) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["outside", "runs", path.name])


@pytest.mark.slow
def test_endless_loop_in_forward_times_out(world):
    tmp_path, outside = world
    # detached: an autograd graph growing each iteration would hit the 4 GiB limit first on a fast machine
    path = hostile(tmp_path, "        while True:\n            x = x.detach() + 0\n")
    before = snapshot(outside)
    out = run(tmp_path, path, Limits(cpu_s=300, wall_s=25, memory_bytes=4 << 30))
    assert out.verdict == "timeout", out.line
    assert out.line == "timeout: wall clock limit of 25 s exceeded; the run was killed"
    assert_untouched(tmp_path, outside, before, path)


def test_memory_bomb_hits_the_limit(world):
    tmp_path, outside = world
    path = hostile(tmp_path, "        waste = torch.ones(1 << 36)\n")  # 256 GiB of float32
    out = run(tmp_path, path)
    assert out.verdict == "memory", out.line
    assert out.line.startswith("memory: the memory limit was hit (RuntimeError:")


@pytest.mark.skipif(abi_version() < 1, reason="needs Linux Landlock to refuse C-level writes")
def test_torch_save_outside_the_run_dir_is_refused(world):
    tmp_path, outside = world
    target, sentinel = outside / "stolen.pt", outside / "sentinel.txt"
    body = f"        torch.save(x, {str(sentinel)!r})\n        torch.save(x, {str(target)!r})\n"
    path = hostile(tmp_path, body)
    before = snapshot(outside)
    out = run(tmp_path, path)
    assert out.verdict == "violation", out.line
    assert "Permission denied" in out.line
    assert_untouched(tmp_path, outside, before, path)
    assert out.result["containment"]["landlock_abi"] >= 1


def test_a_hidden_python_level_write_still_counts(world):
    tmp_path, outside = world
    target = outside / "legacy.pt"
    body = (  # the legacy format writes through Python's open(); the audit hook sees it
        "        try:\n"
        f"            torch.save(x, {str(target)!r}, _use_new_zipfile_serialization=False)\n"
        "        except Exception:\n"
        "            pass\n"
    )
    path = hostile(tmp_path, body)
    before = snapshot(outside)
    out = run(tmp_path, path)
    assert out.verdict == "violation", out.line
    assert f"open('{target}', 'wb')" in out.line or str(target) in out.line
    assert_untouched(tmp_path, outside, before, path)


def test_crash_in_forward_is_reported(world):
    tmp_path, outside = world
    path = hostile(tmp_path, "        raise ValueError('boom in forward')\n")
    out = run(tmp_path, path)
    assert (out.verdict, out.line) == ("crashed", "crashed: ValueError: boom in forward")
    assert out.result["stage"] == "forward"
    line = path.read_text().splitlines().index("        raise ValueError('boom in forward')") + 1
    assert f'attention.py", line {line}, in forward' in out.result["traceback"]  # the file's own lines


def test_a_file_failing_validation_never_runs(world):
    tmp_path, _ = world
    path = tmp_path / "bad.py"
    path.write_text(template_text("mha").replace(FORWARD, FORWARD + "        open('/tmp/x', 'w')\n"))
    out = run(tmp_path, path)
    assert out.verdict == "violation" and out.returncode is None
    assert "forbidden-builtin" in out.line
    assert not (tmp_path / "runs").exists()


def make_dataset(root: Path, vocab_size: int = 64) -> Path:
    root.mkdir(parents=True)
    pattern = np.random.default_rng(0).integers(0, vocab_size, size=23)
    for split, n in (("train", 4000), ("val", 1000)):
        np.tile(pattern, n // 23 + 1)[:n].astype(np.uint16).tofile(root / f"{split}.bin")
    meta = {"vocab_size": vocab_size, "dtype": "uint16", "tokenizer": "test", "eot_token": 0}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.slow
def test_kvlab_train_attention_file_trains_and_scores_contained(world, capsys):
    tmp_path, outside = world
    path = tmp_path / "mla.py"
    assert main(["init-attention", str(path), "--from", "mla"]) == 0
    capsys.readouterr()
    data = make_dataset(outside / "data")
    before = snapshot(outside)
    run_dir = tmp_path / "runs" / "mla"
    sets = [
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=32",
        "model.block_size=32",
        "train.max_iters=6",
        "train.eval_interval=3",
        "train.eval_iters=2",
        "train.batch_size=4",
        "train.grad_accum=1",
        "train.lr=0.01",
        "train.device=cpu",
        "attention.kv_lora_rank=24",
    ]
    code = main(
        [
            "train",
            "--attention-file",
            str(path),
            "--data",
            str(data),
            "--out",
            str(run_dir),
            "--time-limit",
            "300",
            "--memory-limit-gb",
            "4",
            "--set",
            *sets,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[:4] == [
        f"{run_dir}: ok",
        "  kv_bytes_per_token 64 (seed-000 formula), measured 64",  # (rank 24 + rope 8) * 2
        "  head_sharing_ratio 4, latent_rank_ratio 1.5",  # 24 / (8 + 8)
        "  cache: 64 B/token held by the file's cache after a real prefill; cached decoding equals the "
        "full forward",
    ]
    r = json.loads((run_dir / "harness.json").read_text())
    assert r["verdict"] == "ok" and r["kv_flags"] == [] and r["train"]["step"] == 6
    assert r["train"]["val_loss"] < 4.2  # below ln(64): it learned
    assert r["cache"]["per_layer"][0]["tensors"] == {"c_kv": [2, 12, 24], "k_pe": [2, 1, 12, 8]}
    g = r["generation"]
    assert g["method"].startswith("kvlab: cached") and g["generation_toks_per_s"] > 0
    assert g["nocache_toks_per_s"] > 0 and g["nocache_method"].startswith("seed-000")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["attention_sha256"] == r["attention_sha256"]
    assert snapshot(outside) == before  # the dataset was read, not written


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file; create one with `kvlab init-attention"), (b"\x7fELF\x02\x00", "is a binary file")],
)
def test_train_with_a_missing_or_binary_attention_file_is_a_usage_error(world, capsys, content, message):
    tmp_path, outside = world
    path = tmp_path / "attn.py"
    if content is not None:
        path.write_bytes(content)
    data = make_dataset(outside / "data")
    out_dir = tmp_path / "runs" / "x"
    assert main(["train", "--attention-file", str(path), "--data", str(data), "--out", str(out_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"kvlab: error: {path}") and message in err
    assert not out_dir.exists()
    # a readable file that breaks the contract is a violation (exit 1), not a usage error
    path.write_text("def f():\n    pass\n")
    assert main(["train", "--attention-file", str(path), "--data", str(data), "--out", str(out_dir)]) == 1
    assert "region-markers" in capsys.readouterr().out


MiB = 1 << 20


def test_contained_generation_is_cached_only_where_the_file_has_a_cache(world):
    tmp_path, _ = world
    cached = tmp_path / "gqa.py"
    cached.write_text(template_text("gqa"))
    out = run(tmp_path, cached, generate=True, prompt_len=8, new_tokens=8)
    assert out.verdict == "ok", out.line
    cache, g = out.result["cache"], out.result["generation"]
    assert cache["decode_matches_full"] and [x["kv_bytes_per_token"] for x in cache["per_layer"]] == [32, 32]
    assert g["method"].startswith("kvlab: cached greedy decoding") and (
        g["prompt_tokens"],
        g["new_tokens"],
    ) == (8, 8)
    assert g["generation_toks_per_s"] > 0 and g["nocache_toks_per_s"] > 0
    # the seed's own contract (no new_state): timed cache-free, labelled as seed 000's method
    plain = tmp_path / "plain.py"
    plain.write_text(template_text("gqa").replace("def new_state(", "def spare_state("))
    out = run(tmp_path, plain, generate=True, prompt_len=8, new_tokens=8)
    assert out.verdict == "ok", out.line
    assert out.result["cache"] == {
        "interface": False,
        "reason": "CausalSelfAttention defines no new_state(batch_size, max_len, device, dtype)",
    }
    assert out.result["generation"]["method"].startswith("seed-000: cache-free")
    assert set(out.result["generation"]) == {"generation_toks_per_s", "method"}


def test_a_file_past_the_file_size_limit_ends_with_disk(world):
    tmp_path, outside = world
    path = hostile(tmp_path, "        torch.save(torch.zeros(1 << 20), 'big.pt')\n")  # 4 MiB of float32
    before = snapshot(outside)
    out = run(tmp_path, path, Limits(cpu_s=120, wall_s=120, memory_bytes=4 << 30, file_bytes=MiB))
    assert out.verdict == "disk", out.line
    # torch.save's C++ writer only says "unexpected pos"; the file stopped at the limit names the cause
    assert out.line.startswith("disk: big.pt reached the file-size limit of 1 MiB (RuntimeError: ")
    assert (out.run_dir / "big.pt").stat().st_size == MiB
    assert out.result["stage"] == "forward" and out.returncode == 6
    assert_untouched(tmp_path, outside, before, path)


def test_a_swallowed_file_size_error_still_counts(world):
    tmp_path, _ = world
    body = (
        "        try:\n"
        "            torch.save(torch.zeros(1 << 20), 'big.pt')\n"
        "        except Exception:\n"
        "            pass\n"
    )
    out = run(tmp_path, hostile(tmp_path, body), Limits(cpu_s=120, wall_s=120, file_bytes=MiB))
    assert (out.verdict, out.line) == ("disk", "disk: big.pt reached the file-size limit of 1 MiB")
    assert out.result["stage"] == "done"  # it ran to the end, and still gets the verdict


def test_many_small_files_hit_the_run_directory_cap(world):
    tmp_path, outside = world
    body = (  # each file is far below the file-size limit; together they would fill the disk
        "        i = 0\n"
        "        while True:\n"
        "            torch.save(torch.zeros(1 << 12), 'f' + str(i) + '.pt')\n"
        "            i += 1\n"
    )
    path = hostile(tmp_path, body)
    before = snapshot(outside)
    out = run(tmp_path, path, Limits(cpu_s=120, wall_s=60, file_bytes=MiB, disk_bytes=2 * MiB))
    assert (out.verdict, out.line) == ("disk", "disk: the run directory grew past 2 MiB; the run was killed")
    assert out.returncode == -signal.SIGKILL and out.elapsed_s < 30
    assert 2 * MiB < disk_use(out.run_dir) < 200 * MiB  # killed within one poll of crossing the cap
    assert_untouched(tmp_path, outside, before, path)


def test_a_chatty_child_does_not_grow_the_parent(world):
    tmp_path, _ = world
    path = hostile(tmp_path, "        for i in range(40):\n            print('y' * 999999)\n")  # 40 MB
    tracemalloc.start()
    try:
        out = run(tmp_path, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.verdict == "ok", out.line
    assert out.output_bytes >= 40 * 1_000_000  # all of it was read (the child never blocked on the pipe)
    assert peak < 4 * MiB  # the parent kept a 64 KiB tail, not 40 MB (communicate() held all of it)
    assert len(out.output) == 4000 and out.output.endswith("y\nok\n")


def test_verdicts_from_signals():
    limits = Limits(cpu_s=7)
    assert (
        _verdict(-signal.SIGXCPU, False, limits, {}, "")[1]
        == "timeout: CPU time limit of 7 s exceeded (SIGXCPU)"
    )
    assert _verdict(-signal.SIGKILL, False, limits, {}, "")[0] == "memory"
    assert _verdict(-signal.SIGXFSZ, None, Limits(file_bytes=MiB), {}, "")[1] == (
        "disk: a file reached the file-size limit of 1 MiB (SIGXFSZ)"
    )
    assert _verdict(1, False, limits, {}, "Traceback\nImportError: x")[1].endswith("(ImportError: x)")
