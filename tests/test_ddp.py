"""torchrun DDP on 2 CPU processes (gloo) matches one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kvlab.cli import main
from kvlab.train.checkpointing import read_metrics
from test_train import make_dataset

SETS = [
    "train.max_iters=6", "train.eval_interval=3", "train.eval_iters=2", "train.batch_size=4",
    "train.grad_accum=4", "train.lr=1e-2", "train.device=cpu", "model.n_layer=2", "model.n_embd=32",
    "model.n_head=4", "model.block_size=32",
]  # fmt: skip


@pytest.mark.slow  # two torch processes start up: ~15-30 s on 2 busy cores
def test_ddp_two_processes_match_single_process(tmp_path):
    data = make_dataset(tmp_path / "data")
    common = ["train", "--preset", "cpu-tiny", "--attention", "gqa", "--data", str(data), "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kvlab.cli", *common, "--out", str(tmp_path / "ddp"), "--set", *SETS]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 6, val_loss") == 1  # rank 0 alone reports (and writes files)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1)
    try:
        assert main([*common, "--out", str(tmp_path / "single"), "--set", *SETS]) == 0
    finally:
        torch.set_num_threads(before)
    ddp, single = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert [m["step"] for m in ddp] == [m["step"] for m in single] == [3, 6]
    for a, b in zip(ddp, single):
        assert a["tokens"] == b["tokens"] == a["step"] * 4 * 4 * 32  # the same global batch
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert single[-1]["val_loss"] < single[0]["val_loss"]  # it trained, so matching means something
    wa, wb = (
        load_file(tmp_path / "ddp" / "model.safetensors"),
        load_file(tmp_path / "single" / "model.safetensors"),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
