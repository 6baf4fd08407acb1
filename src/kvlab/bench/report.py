"""Bench outputs: aggregate cells over seeds, then write results.json, results.md and pareto.png.

results.json has one row per (method, regime) with every numeric metric as mean/std/values over seeds
and the run's config; results.md is shaped like seed 000's table (a row per method, columns per regime
and metric, "mean ± std"; the measured cache bytes per token at each regime's context beside the
asymptotic KV bytes); pareto.png is drawn by kvlab.bench.plot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kvlab.bench.methods import retrofit_kind
from kvlab.bench.plot import pareto_regimes, plot_pareto
from kvlab.bench.suites import Suite
from kvlab.checkpoint import atomic_write, environment_info, write_json

# (metric key, column title, lower is better?) shown per regime in the main table, seed 000's order
REGIME_COLUMNS = [
    ("val_loss", "val loss", True),
    ("heldout_loss", "heldout loss", True),
    ("generation_toks_per_s", "gen tok/s", False),
]
# keys that hold the analytic cache size next to measured_cache_bytes (eval's name for it)
ANALYTIC_KEYS = ("analytic_cache_bytes", "kv_cache_bytes", "expected_cache_bytes")


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as {"a.b": value}; strings, lists, None are dropped."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(flatten_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
        elif isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0.0 for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def cache_check(metrics: dict[str, float]) -> bool | None:
    """measured_cache_bytes == analytic bytes for one cell; None if the cell does not report both. For an
    attention file: no MISMATCH between its declared (seed-000 formula) bytes and what was measured."""
    if "kv_mismatches" in metrics:
        return metrics["kv_mismatches"] == 0
    measured = metrics.get("measured_cache_bytes")
    analytic = next((metrics[k] for k in ANALYTIC_KEYS if k in metrics), None)
    if measured is None or analytic is None:
        return None
    return measured == analytic


def aggregate(results: list[dict[str, Any]], methods: list[str], regimes: list[str]) -> list[dict[str, Any]]:
    """One row per (method, regime) present in results, in suite order, with mean/std over seeds."""
    rows = []
    for method in methods:
        for regime in regimes:
            cells = sorted(
                (r for r in results if r["method"] == method and r["regime"] == regime),
                key=lambda r: r["seed"],
            )
            if not cells:
                continue
            flats = [flatten_metrics(c["metrics"]) for c in cells]
            keys = [k for k in flats[0] if all(k in f for f in flats)]
            metrics = {}
            for k in keys:
                values = [f[k] for f in flats]
                m, s = mean_std(values)
                metrics[k] = {"mean": m, "std": s, "values": values}
            checks = [cache_check(f) for f in flats]
            config = {k: v for k, v in cells[0]["config"].items()}
            config["train"] = {k: v for k, v in config["train"].items() if k != "seed"}
            row = {
                "method": method,
                "regime": regime,
                "seeds": [c["seed"] for c in cells],
                "n_seeds": len(cells),
                "metrics": metrics,
                "cache_bytes_match": None if None in checks else all(checks),
                "cells": [c["key"] for c in cells],
                "config": config,
            }
            files = [c["metrics"]["attention_file"] for c in cells if _file_info(c["metrics"])]
            if files:  # what a contained attention-file run reported besides numbers (flags, methods)
                row["attention_file"] = {
                    "path": str(files[0].get("path")),
                    "sha256": str(files[0].get("sha256")),
                    "cache": str(files[0].get("cache")),
                    "generation_method": str(files[0].get("generation_method")),
                    "kv_flags": sorted({str(f) for info in files for f in info.get("kv_flags") or []}),
                }
            rows.append(row)
    return rows


def _file_info(metrics: dict[str, Any]) -> bool:
    return isinstance(metrics.get("attention_file"), dict)


def _fmt(stat: dict[str, float] | None, digits: int) -> str:
    if stat is None:
        return "–"
    values = stat.get("values", [])
    if len(values) > 1 and len(set(values)) > 1:  # identical over seeds (KV bytes, ratios): no "± 0"
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if float(stat["mean"]).is_integer():  # counts and sizes (params, bytes, tokens) read as integers
        return f"{int(stat['mean'])}"
    return f"{stat['mean']:.{digits}f}"


def _digits(key: str) -> int:
    return 1 if key.endswith(("toks_per_s", "bytes", "bytes_per_token", "bytes_per_token_total")) else 3


def method_kind(model: dict[str, Any], attention_file: str | None = None) -> str:
    """The kind column: the attention kind of a model trained from scratch, the `--to` of an uptrained one
    ("... after training" when its search ran after uptraining), `file NAME` for an attention file."""
    if attention_file is not None or "attention_file" in model:
        return f"file {Path(attention_file).name}" if attention_file else "file"
    if "pretrained" in model:
        return retrofit_kind(model)
    return model["attention"]["kind"]


def kv_cell(row: dict[str, Any]) -> str:
    """KV B/token: the analytic figure; for an attention file the declared one (seed-000 formula) with the
    measured K/V bytes beside it, MISMATCH where the file reads more than it declares."""
    m = row["metrics"]
    declared = _fmt(m.get("kv_bytes_per_token"), 0)
    if "attention_file" not in row:
        return declared
    measured = m.get("kv_measured_bytes_per_token")
    text = f"{declared} (measured {_fmt(measured, 0)})" if measured else f"{declared} (not measured)"
    return text + (" **MISMATCH**" if m.get("kv_mismatches", {}).get("mean", 0) > 0 else "")


def extra_columns(rows: list[dict[str, Any]], regime: str) -> list[tuple[str, str, bool]]:
    """Seed 000's 345M columns when a regime has them: each corpus's held-out loss (when heldout_loss
    is a mean over several) and each zero-shot task's acc / acc_norm (flattened keys)."""
    keys: list[str] = []
    for r in rows:
        if r["regime"] == regime:
            keys += [k for k in r["metrics"] if k not in keys]
    corpora = [k for k in keys if k.startswith("heldout_losses.")]
    cols = [(k, f"heldout {k.split('.', 1)[1]}", True) for k in corpora] if len(corpora) > 1 else []
    if "step0.heldout_loss" in keys:  # an uptraining suite: the converted model before training, too
        cols.insert(0, ("step0.heldout_loss", "heldout loss at step 0", True))
    for k in keys:
        parts = k.split(".")
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] in ("acc", "acc_norm"):
            cols.append((k, f"{parts[1]} {parts[2]}", False))
    return cols


def markdown_table(rows: list[dict[str, Any]], methods: list[str], regimes: list[str]) -> str:
    """Seed 000's layout: a row per method; KV columns once, then val/heldout loss and tok/s per regime
    (plus per-corpus held-out losses and zero-shot accuracies where the regime has them)."""
    by = {(r["method"], r["regime"]): r for r in rows}
    columns = {reg: REGIME_COLUMNS + extra_columns(rows, reg) for reg in regimes}
    header = [
        "Method",
        "kind",
        "KV B/token ↓",
        "measured B/token @ctx ↓",
        "KV B/token all layers ↓",
        "cache measured = analytic",
    ]
    for reg in regimes:
        header += [f"{title} {reg} {'↓' if low else '↑'}" for _, title, low in columns[reg]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        present = [by[(m, reg)] for reg in regimes if (m, reg) in by]
        if not present:
            continue
        first = present[0]
        kind = method_kind(first["config"]["model"], first["config"].get("attention_file"))
        checks = [r["cache_bytes_match"] for r in present]
        check = "?" if None in checks else ("yes" if all(checks) else "**NO**")
        if "attention_file" in first and check == "yes" and first["metrics"].get("kv_notes", {}).get("mean"):
            check = "yes (notes)"  # measured below declared: e.g. MHA's K/V span at most n_embd dims
        cells = [
            m,
            kind,
            kv_cell(first),
            measured_per_token(present),
            _fmt(first["metrics"].get("kv_bytes_per_token_total"), 0),
            check,
        ]
        for reg in regimes:
            row = by.get((m, reg))
            for key, _, _ in columns[reg]:
                cells.append(_fmt(row["metrics"].get(key), _digits(key)) if row else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measured_per_token(rows: list[dict[str, Any]]) -> str:
    """measured_cache_bytes_per_token at each context length the method's regimes use: "40 @16, 12 @64"
    (bf16, per layer; equal to KV B/token for a cache that grows by the same bytes every token)."""
    seen: dict[int, str] = {}
    for r in rows:
        m = r["metrics"]
        if "measured_cache_bytes_per_token" in m and "cache_tokens" in m:
            ctx = int(m["cache_tokens"]["mean"])
            seen.setdefault(ctx, f"{m['measured_cache_bytes_per_token']['mean']:.4g} @{ctx}")
    return ", ".join(seen[c] for c in sorted(seen)) or "–"


def details_tables(rows: list[dict[str, Any]], methods: list[str], regimes: list[str]) -> str:
    """Per regime, every other metric the evaluator reported (perplexities, accuracy, ratios ...)."""
    shown = {k for k, _, _ in REGIME_COLUMNS} | {"kv_bytes_per_token", "kv_bytes_per_token_total"}
    out = []
    for reg in regimes:
        rrows = [r for m in methods for r in rows if r["method"] == m and r["regime"] == reg]
        if not rrows:
            continue
        keys = [k for k in rrows[0]["metrics"] if k not in shown]
        if not keys:
            continue
        out += [f"### {reg}", "", "| Method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in rrows:
            out.append(
                f"| {r['method']} | " + " | ".join(_fmt(r["metrics"].get(k), _digits(k)) for k in keys) + " |"
            )
        out.append("")
    return "\n".join(out)


def files_section(rows: list[dict[str, Any]]) -> list[str]:
    """results.md's "Attention files" section: per file row, where it came from and what was measured."""
    from kvlab.bench.files import summary_lines

    lines = [line for r in rows if "attention_file" in r for line in summary_lines(r)]
    if not lines:
        return []
    return [
        "## Attention files",
        "",
        "Trained and evaluated in contained children (kvlab.harness.contain). KV B/token is what the file's "
        "modules declare by seed 000's formula; measured K/V: the rank of the K/V the attention hands to "
        "SDPA; the file's cache: what its new_state cache holds after a real prefill (bf16 accounting). "
        "The figures come from the child's report, which the submission's process wrote.",
        "",
        *lines,
        "",
    ]


def failed_section(failed: list[dict[str, Any]]) -> list[str]:
    if not failed:
        return []
    lines = ["## Failed cells", "", "The rest of the bench finished; each cell's error.txt has details.", ""]
    lines += [f"- {f['cell']} (cell {f['key']}): {f['error']}" for f in failed]
    return lines + [""]


def write_reports(
    suite: Suite,
    results: list[dict[str, Any]],
    out_dir: str | Path,
    failed: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """results.json, results.md and pareto.png under out_dir; returns their paths. failed: the cells that
    failed in this run ({"cell", "key", "error"}), listed in both files."""
    out_dir = Path(out_dir)
    methods, regimes = list(suite.methods), [r.name for r in suite.regimes]
    rows = aggregate(results, methods, regimes)
    failed = list(failed or [])
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "pareto.png"}
    write_json(
        paths["json"],
        {
            "suite": suite.name,
            "source": suite.source,
            "seeds": list(suite.seeds),
            "rows": rows,
            "failed": failed,
            # the report's own machine and commit; cells resumed from earlier runs keep theirs in
            # cells/<key>/eval.json, and every commit that produced a cell is listed
            "environment": environment_info(),
            "cell_commits": sorted(
                {(r.get("environment") or {}).get("git_commit") or "unrecorded" for r in results}
            ),
        },  # fmt: skip
    )
    seeds = ", ".join(map(str, suite.seeds))
    md = [
        f"# kvlab bench: {suite.name}",
        "",
        f"{suite.description}. Mean ± std over seeds ({seeds}); losses in nats/token; KV bytes at bf16 "
        "(per layer: seed 000's kv_bytes_per_token). 'cache measured = analytic': cache.nbytes() after a "
        "real prefill equals the analytic kv_cache_bytes in every seed. 'measured B/token @ctx': the "
        "nbytes() of a bf16 cache of that many tokens, per token and layer (what a user pays at that "
        "context; Context-KV's current chunk included).",
        "",
        markdown_table(rows, methods, regimes),
        "",
    ]
    md += files_section(rows) + failed_section(failed)
    details = details_tables(rows, methods, regimes)
    if details:
        md += ["## Other metrics", "", details]
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text("\n".join(md) + "\n"))
    plot_regs = pareto_regimes(suite, rows)
    if plot_regs:
        plot_pareto(rows, methods, plot_regs, paths["png"], suite.name)
    else:
        paths.pop("png")
    return paths
