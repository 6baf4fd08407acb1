"""The bench plan: a suite expanded into cells (method x regime x seed), each keyed by a config hash.

A cell's key hashes its resolved model (with attention), training config (with seed), data and the
held-out corpus it is scored on; its `train_key` hashes the training part only, so regimes that train
the same model share one run. `format_plan` prints what a bench will do without training anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.bench.methods import AttentionFile, SuiteError
from kvlab.bench.suites import Suite
from kvlab.commands.info import KV_COLUMNS, format_table
from kvlab.model import GPT

HASH_CHARS = 16  # 64 bits of sha256: collisions are not a concern at bench scale


def config_hash(obj: Any) -> str:
    """Stable hash of a JSON-able config: key order, whitespace and Python version do not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def resolve_train(fields: dict[str, Any], model_preset: str | None = None) -> dict[str, Any]:
    """The full TrainConfig (defaults filled in) as a dict, so a changed default changes the hash.

    Starts from `fields["preset"]` (a training preset) when given, else from the model preset's own
    training preset when there is one, else from TrainConfig's defaults.
    """
    from kvlab.config import ConfigError, TrainConfig
    from kvlab.train.presets import TRAIN_PRESETS

    fields = dict(fields)
    preset = fields.pop("preset", model_preset if model_preset in TRAIN_PRESETS else None)
    if preset is not None and preset not in TRAIN_PRESETS:
        raise SuiteError(f"train.preset={preset!r} unknown; choose one of {', '.join(TRAIN_PRESETS)}")
    base = TRAIN_PRESETS[preset] if preset is not None else {}
    try:
        return TrainConfig.from_dict({**base, **fields}).to_dict()
    except ConfigError as e:
        raise SuiteError(f"train: {e}") from e


@dataclass(frozen=True)
class Cell:
    method: str
    regime: str
    seed: int
    model: dict[str, Any]  # ModelConfig.to_dict()
    train: dict[str, Any]  # resolved TrainConfig fields, seed included
    data: dict[str, Any]  # kvlab.data.prepare arguments
    eval: dict[str, Any]  # evaluate() options of the suite
    heldout: str | tuple[str, ...]  # "heldout" = the training corpus's held-out split, or corpus name(s)
    train_key: str
    key: str
    # an attention-file method: the file (absolute path; not hashed: its content is, in model)
    attention_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.method} | {self.regime} | seed {self.seed}"

    def config(self) -> dict[str, Any]:
        config = {
            "model": self.model,
            "train": self.train,
            "data": self.data,
            "eval": {**self.eval, "heldout": self.heldout},
        }
        if self.attention_file is not None:
            config["attention_file"] = self.attention_file
        return config


def make_cell(suite: Suite, method: str, regime, seed: int) -> Cell:
    model = suite.cell_model(method, regime)
    base: dict[str, Any] = {}
    if suite.pretrained is not None:  # uptraining starts from the recipe's settings (kvlab uptrain's)
        from kvlab.retrofit.uptrain import RECIPE_DEFAULTS

        base = RECIPE_DEFAULTS[suite.methods[method].recipe]
    try:
        train = resolve_train({**base, **suite.train, **regime.train, "seed": seed}, suite.model_preset)
    except SuiteError as e:
        raise SuiteError(f"{suite.source}: regime {regime.name!r}: {e}") from e
    data = dict(suite.data)
    spec = suite.methods[method]
    train_part = {"model": model, "train": train, "data": data}
    return Cell(
        method=method,
        regime=regime.name,
        seed=seed,
        model=model,
        train=train,
        data=data,
        eval=dict(suite.eval),
        heldout=regime.heldout,
        train_key=config_hash(train_part),
        key=config_hash({**train_part, "eval": {**suite.eval, "heldout": regime.heldout}}),
        attention_file=str(spec.path) if isinstance(spec, AttentionFile) else None,
    )


def plan_cells(suite: Suite) -> list[Cell]:
    """Every cell, seed-major so an interrupted bench already holds one seed of every method."""
    return [make_cell(suite, m, r, s) for s in suite.seeds for m in suite.methods for r in suite.regimes]


def tokens_per_run(cell: Cell) -> int:
    """Training tokens of a cell's run: iterations x batch x accumulation x context."""
    t = cell.train
    return (
        int(t.get("max_iters", 0))
        * int(t.get("batch_size", 1))
        * int(t.get("grad_accum", 1))
        * int(cell.model["block_size"])
    )


def method_kv_table(suite: Suite) -> list[dict[str, Any]]:
    """Analytic KV metrics per method (first regime's model), built on the meta device: no memory."""
    if suite.pretrained is not None:
        return retrofit_kv_table(suite)
    rows = []
    for method, spec in suite.methods.items():
        cfg = suite.model_config(method, suite.regimes[0])
        if isinstance(spec, AttentionFile):  # untrusted code: built in a contained child, never here
            from kvlab.bench.files import declared_row

            rows.append({"method": method, "kind": spec.kind, **declared_row(spec, cfg)})
            continue
        with torch.device("meta"):
            model = GPT(cfg)
        rows.append(
            {
                "method": method,
                "kind": cfg.attention.kind,
                "params_M": model.num_params() / 1e6,
                **model.kv_metrics(),
            }
        )
    return rows


def retrofit_kv_table(suite: Suite) -> list[dict[str, Any]]:
    """KV metrics per method of a [source] suite, from its real converters applied to a stand-in: a random
    model with the source's attention shape (layers, heads, KV heads, head_dim, positions) but a tiny
    vocabulary and MLP, which KV bytes do not depend on. Nothing is fetched or loaded; a rank search
    (`search:B`) is not run: its row shows the bytes of the budget it searches to (at or just under)."""
    import dataclasses

    from kvlab.retrofit.source import source_config

    try:
        cfg = source_config(suite.pretrained["from"])
    except Exception as e:
        raise SuiteError(f"{suite.source}: source.from={suite.pretrained['from']!r}: {e}") from e
    block = int(suite.model["block_size"])
    proxy_cfg = dataclasses.replace(cfg, vocab_size=64, intermediate_size=16, block_size=block)
    torch.manual_seed(0)
    proxy = GPT(proxy_cfg).eval()
    calib = [torch.randint(0, 64, (1, min(block, 8)))]  # PCA on a stand-in: only shapes matter here
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: threads only contend (minutes, not seconds, on busy cores)
    try:
        for method, retro in suite.methods.items():
            rows.append(_retrofit_kv_row(suite, method, retro, proxy, calib))
    finally:
        torch.set_num_threads(threads)
    return rows


def _retrofit_kv_row(suite: Suite, method: str, retro, proxy: GPT, calib) -> dict[str, Any]:
    from kvlab.retrofit.structures import convert, parse_structure

    steps = parse_structure(retro.to)
    budget = next((float(a[0]) for n, a in steps if n == "search" and a), None)
    convertible = "+".join(p for p in retro.to.split("+") if p.strip().partition(":")[0] != "search")
    try:
        model = convert(proxy, convertible or "none", calib)
    except Exception as e:
        raise SuiteError(f"{suite.source}: methods.{method}: {e}") from e
    kv = model.kv_metrics()
    if budget is not None:  # searched to at most budget x the full-rank bytes (mean rank likewise)
        for key in ("kv_bytes_per_token", "kv_bytes_per_token_total", "latent_rank_ratio"):
            kv[key] *= budget
    return {"method": method, "kind": retro.kind, "recipe": retro.recipe, **kv}


def _fmt_tokens(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_plan(suite: Suite, cells: list[Cell], out_dir: str | Path | None = None) -> str:
    """The plan as text: cells, training runs, regimes with token budgets, analytic KV per method."""
    runs = {c.train_key: c for c in cells}
    done = set()
    if out_dir is not None:
        done = {c.key for c in cells if (Path(out_dir) / "cells" / c.key / "eval.json").is_file()}
    n_m, n_r, n_s = len(suite.methods), len(suite.regimes), len(suite.seeds)
    total_tokens = sum(tokens_per_run(c) for c in runs.values())
    lines = [
        f"suite {suite.name}: {suite.description}".rstrip(": "),
        f"  {n_m} methods x {n_r} regimes x {n_s} seeds ({', '.join(map(str, suite.seeds))}) "
        f"= {len(cells)} cells; "
        f"{len(runs)} training runs, {_fmt_tokens(total_tokens)} training tokens in all",
        (
            f"  source {suite.pretrained['from']} (calibration: {suite.pretrained['calibration']} batches), "
            f"model {suite.model}"
            if suite.pretrained is not None
            else f"  model {suite.model_preset} {suite.model or ''}".rstrip()
        ),  # fmt: skip
        f"  data {suite.data}",
        "",
        "regimes (per method and seed):",
    ]
    first = {r.name: next(c for c in cells if c.regime == r.name) for r in suite.regimes}
    run_names: dict[str, str] = {}
    for r in suite.regimes:
        c = first[r.name]
        t = c.train
        shared = run_names.setdefault(c.train_key, r.name)
        trains = "trains" if shared == r.name else f"reuses {shared}'s run"
        budget = (
            f"{t.get('max_iters', '?')} iters x batch {t.get('batch_size', '?')} "
            f"x accum {t.get('grad_accum', 1)}"
            f" x ctx {c.model['block_size']} = {_fmt_tokens(tokens_per_run(c))} tokens"
        )
        heldout = r.heldout if isinstance(r.heldout, str) else "mean of " + ", ".join(r.heldout)
        lines.append(f"  {r.name:<18} {trains:<28} {budget}; held-out: {heldout}")
    if suite.eval.get("tasks"):
        from kvlab.eval.tasks import parse_tasks

        names = ", ".join(n for n, _ in parse_tasks(suite.eval["tasks"]))
        lines.append(f"  zero-shot tasks (lm-eval rules, acc and acc_norm): {names}")
    if suite.pretrained is not None:
        lines += [
            "",
            f"methods: converted from {suite.pretrained['from']} and uptrained (analytic KV footprint at "
            "bf16, from the converters applied to a stand-in of the source's shape; search rows: the budget)",
        ]
        columns = [("method", "method", ""), ("kind", "--to", ""), ("recipe", "recipe", "")] + KV_COLUMNS[2:]
    else:
        lines += ["", "methods (analytic KV footprint at bf16, from the model on the meta device):"]
        columns = [("method", "method", ""), ("kind", "kind", "")] + KV_COLUMNS[1:]  # kvlab info's columns
    rows = method_kv_table(suite)
    if any(isinstance(spec, AttentionFile) for spec in suite.methods.values()):
        lines.append(
            "  (attention files: the bytes their modules declare by seed 000's formula, built in a contained "
            "child on the meta device; measured bytes and their caches at run time)"
        )
    table = [r for r in rows if "error" not in r]
    if table:
        lines += ["  " + line for line in format_table(table, columns).splitlines()]
    for r in rows:
        spec = suite.methods[r["method"]]
        if isinstance(spec, AttentionFile):
            lines.append(f"  {r['method']}: attention file {spec.path}")
            if "error" in r:  # the bench will record its cells as failed, with this verdict
                lines += [f"    {line}" for line in r["error"].splitlines()]
    if out_dir is not None:
        lines += [
            "",
            f"{len(done)} of {len(cells)} cells already finished in {out_dir}; "
            f"{len(cells) - len(done)} to run",
        ]
    return "\n".join(lines)
