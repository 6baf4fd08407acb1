"""Seed 000's 345M regime as a suite: its budget and baseline KV bytes, several held-out corpora per
regime (heldout_loss = their mean), zero-shot tasks in [eval], and their columns in results.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvlab.bench import SuiteError, aggregate, load_suite, plan_cells
from kvlab.bench.plan import method_kv_table, tokens_per_run
from kvlab.bench.report import markdown_table
from kvlab.bench.runner import run_bench
from kvlab.cli import main
from test_bench import MICRO_TOML, FakeBackend


def test_seed_345m_plan(capsys):
    suite = load_suite("seed-345m")
    kv = {r["method"]: r for r in method_kv_table(suite)}
    assert {m: kv[m]["kv_bytes_per_token"] for m in ("mha", "gqa", "mqa", "mla")} == {
        "mha": 4096,
        "gqa": 1024,
        "mqa": 256,
        "mla": 192,
    }
    assert kv["mla"]["head_sharing_ratio"] == 16 and kv["mla"]["latent_rank_ratio"] == 0.25
    (regime,) = suite.regimes
    assert regime.heldout == ("wikitext-2", "wikitext-103", "lambada")
    assert suite.eval["tasks"] == ["arc_easy", "hellaswag", "piqa", "winogrande"]
    cell = plan_cells(suite)[0]
    assert tokens_per_run(cell) == 13_535 * 524_288 and cell.train["lr"] == 3e-4
    assert cell.model["n_layer"] == 24 and cell.model["n_head"] == 16 and cell.model["n_embd"] == 1024
    assert main(["bench", "--suite", "seed-345m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "7.1B tokens; held-out: mean of wikitext-2, wikitext-103, lambada" in out
    assert "zero-shot tasks (lm-eval rules, acc and acc_norm): arc_easy, hellaswag, piqa, winogrande" in out
    mla_line = next(line for line in out.splitlines() if line.strip().startswith("mla "))
    assert " 192 " in mla_line and "4608" in mla_line  # per layer, and over 24 layers


class MeanBackend(FakeBackend):
    """FakeBackend that also reports per-corpus losses and task accuracies, as evaluate() does."""

    def evaluate(self, run_dir, heldout, data_dir, **options):
        out = super().evaluate(run_dir, "x", data_dir)
        self.evaluated[-1] = (str(run_dir), heldout)
        losses = {name: out["heldout_loss"] + i for i, name in enumerate(heldout)}
        out.update(heldout_loss=sum(losses.values()) / len(losses), heldout_losses=losses)
        out["tasks"] = {t: {"acc": 0.25, "acc_norm": 0.5, "items": 4} for t in options["tasks"]}
        return out


def test_list_heldout_and_task_columns(tmp_path):
    text = MICRO_TOML.replace('heldout = "sotu"', 'heldout = ["sotu", "shakespeare"]')
    text = text.replace("limit = 5", 'limit = 5\ntasks = ["piqa", "winogrande"]')
    path = tmp_path / "micro.toml"
    path.write_text(text)
    suite = load_suite(str(path))
    backend = MeanBackend()
    result = run_bench(suite, tmp_path / "out", backend=backend, log=lambda *_: None, write_report=False)
    assert ("sotu", "shakespeare") in {h for _, h in backend.evaluated}
    rows = aggregate(result.results, list(suite.methods), [r.name for r in suite.regimes])
    md = markdown_table(rows, list(suite.methods), [r.name for r in suite.regimes])
    header = md.splitlines()[0]
    assert "heldout sotu eval-other ↓" in header and "heldout shakespeare eval-other ↓" in header
    assert "piqa acc_norm train ↑" in header and "winogrande acc train ↑" in header
    assert "heldout heldout train" not in header  # one corpus: no per-corpus column


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.replace("limit = 5", 'limit = 5\ntasks = ["boolq"]'),
            "eval.tasks=['boolq']: unknown task",
        ),
        (lambda t: t.replace('heldout = "sotu"', "heldout = []"), "regimes.eval-other.heldout=[]"),
        (lambda t: t.replace('heldout = "sotu"', 'heldout = ["sotu", 3]'), "a list of them"),
    ],
)
def test_suite_errors(tmp_path: Path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(MICRO_TOML))
    with pytest.raises(SuiteError) as e:
        load_suite(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)
