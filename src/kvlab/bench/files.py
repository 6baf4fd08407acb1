"""Bench methods given by attention files: seed 000's substrate around an untrusted file, contained.

A cell of such a method never imports the file into the bench's process. Its training run
(`runs/<train_key>/`) is one contained child (kvlab.harness.contain.run_contained, as `kvlab train
--attention-file` runs it) that builds, measures, trains, then evaluates the trained model in memory; a
cell whose run another regime already trained gets a contained child of its own (`cells/<key>/contained/`)
that loads those weights and evaluates. The bench resolves the held-out corpora and zero-shot task files
itself (`cells/<key>/eval_inputs/`, outside every child's writable directory) so that a child only reads.
The figures come back in the child's harness.json: the declared (seed-000 formula) KV bytes are the row's
KV B/token, the measured ones stand beside them, and a verdict other than ok fails the cell with its line.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kvlab.bench.methods import AttentionFile
from kvlab.bench.plan import Cell
from kvlab.checkpoint import write_json
from kvlab.config import ModelConfig
from kvlab.errors import KvlabError

CONTAINED_DIR = "contained"  # cells/<key>/contained: an evaluation-only contained run
INPUTS_DIR = "eval_inputs"  # cells/<key>/eval_inputs: corpora resolved by the bench, read by the child
OUTPUT_FILE = "contained_output.txt"  # cells/<key>/: the tail of the child's output, for a failed cell
DECLARE_LIMITS = dict(cpu_s=300, wall_s=300.0, memory_bytes=8 << 30, threads=1)  # --dry-run's build
MAX_FLAGS = 50


class AttentionFileFailed(KvlabError):
    """A contained run of an attention file that did not end ok: the message is its verdict line."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details  # the full verdict and the output tail (cells/<key>/error.txt)


def file_sha256(path: str | Path) -> str:
    from kvlab.harness.template import read_text

    return hashlib.sha256(read_text(path).encode("utf-8")).hexdigest()


def substrate_config(cell: Cell, data_dir: Path) -> ModelConfig:
    """The substrate the cell trains (its model dict minus the file's part), vocabulary fitted to the data."""
    from kvlab.train.batches import read_meta
    from kvlab.train.rundir import resolve_vocab

    fields = {k: v for k, v in cell.model.items() if k != "attention_file"}
    return resolve_vocab(ModelConfig.from_dict(fields), read_meta(data_dir), fixed=False)


def _limits(spec: AttentionFile):
    import torch

    from kvlab.harness.contain import Limits

    threads = max(1, torch.get_num_threads())  # what an in-process cell of the bench would use
    memory = None if spec.memory_limit_gb <= 0 else int(spec.memory_limit_gb * (1 << 30))
    return Limits(
        cpu_s=int(spec.time_limit * threads) + 1, wall_s=spec.time_limit, memory_bytes=memory, threads=threads
    )


def _device(train: dict[str, Any]) -> str:
    device = str(train.get("device", "auto"))
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def write_eval_inputs(cell: Cell, data_dir: Path, dest: Path) -> dict[str, Any]:
    """The child's `evaluate` job: the cell's held-out corpora resolved here (as KvlabBackend.evaluate
    resolves them for a run directory) into .npy/.json files under dest, and its evaluate() options."""
    from kvlab.data import load_tokenizer
    from kvlab.eval.corpora import CLOZE_SIZE, resolve_corpus
    from kvlab.train.batches import VAL_SEED_OFFSET, read_meta

    options = dict(cell.eval)
    dest, data_dir = Path(dest).resolve(), Path(data_dir).resolve()  # the child runs elsewhere
    dest.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer, tokenizer_dir = load_tokenizer(data_dir), str(data_dir)
    except (ImportError, KvlabError):  # a dataset without a tokenizer: token-level metrics only
        tokenizer, tokenizer_dir = None, None
    names = [cell.heldout] if isinstance(cell.heldout, str) else list(cell.heldout)
    run_tokenizer = read_meta(data_dir).get("tokenizer")
    corpora = []
    for i, name in enumerate(names):
        corpus = resolve_corpus(
            name, data_dir, tokenizer, options.get("cloze_size", CLOZE_SIZE), 0, run_tokenizer
        )
        if not options.get("word_perplexity", True):  # as KvlabBackend.evaluate: skip rolling perplexity
            corpus.documents = None
        entry: dict[str, Any] = {
            "name": corpus.name,
            "passages_source": corpus.passages_source,
            "detokenize": corpus.detokenize,
            "info": corpus.info,
        }
        if corpus.tokens is not None:
            np.save(dest / f"corpus{i}.tokens.npy", np.asarray(corpus.tokens, dtype=np.int64))
            entry["tokens"] = str(dest / f"corpus{i}.tokens.npy")
        for part in ("documents", "passages"):
            if getattr(corpus, part):
                write_json(dest / f"corpus{i}.{part}.json", list(getattr(corpus, part)))
                entry[part] = str(dest / f"corpus{i}.{part}.json")
        corpora.append(entry)
    spec = {
        "corpora": corpora,
        "tokenizer": tokenizer_dir,
        "dataset_dir": str(data_dir),
        "block_size": int(cell.model["block_size"]),
        # a run directory's defaults (kvlab.eval.report._run_context): the training batch and val batches
        "batch_size": options.get("batch_size") or cell.train.get("batch_size", 8),
        "eval_iters": options.get("eval_iters") or cell.train.get("eval_iters", 200),
        "seed": int(cell.train.get("seed", 0)) + VAL_SEED_OFFSET,
        "limit": options.get("limit"),
    }
    if options.get("tasks"):  # local files, so the child never fetches (it could not write the cache)
        from kvlab.eval.tasks import TASKS, olmo_task_dir, parse_tasks

        parsed = parse_tasks(options["tasks"])
        root = olmo_task_dir() if any(path is None for _, path in parsed) else None
        spec["tasks"] = ",".join(
            f"{name}={Path(path).resolve() if path else root / TASKS[name].olmo_dir}" for name, path in parsed
        )
        spec["task_limit"] = options.get("task_limit")
    return spec


def run_file_cell(
    cell: Cell, spec: AttentionFile, out_dir: Path, data_dir: Path, log
) -> tuple[dict[str, Any], bool]:
    """Train (unless its run is done) and evaluate one attention-file cell, contained; (metrics, trained).

    Raises AttentionFileFailed with the verdict line when a contained run does not end ok."""
    from kvlab.harness.validate import validate_file

    if file_sha256(spec.path) != cell.model["attention_file"]["sha256"]:
        raise AttentionFileFailed(
            f"{spec.path} changed since the bench planned this cell; run the bench again to train the "
            "new file"
        )
    violations = validate_file(spec.path)  # as run_contained would, before any work for the cell
    if violations:
        lines = [v.format(spec.path) for v in violations]
        shown = "; ".join(lines[:3]) + (f"; ... ({len(lines) - 3} more)" if len(lines) > 3 else "")
        raise AttentionFileFailed(f"violation: the file fails validation: {shown}", "\n".join(lines))
    limits = _limits(spec)
    device = _device(cell.train)
    out_dir, data_dir = Path(out_dir).resolve(), Path(data_dir).resolve()
    cell_dir = out_dir / "cells" / cell.key
    (cell_dir / OUTPUT_FILE).unlink(missing_ok=True)
    try:
        return _run_contained_cell(cell, spec, out_dir, data_dir, cell_dir, limits, device, log)
    finally:
        shutil.rmtree(cell_dir / INPUTS_DIR, ignore_errors=True)  # copies of the corpora: read, done


def _run_contained_cell(cell, spec, out_dir, data_dir, cell_dir, limits, device, log):
    from kvlab.bench.runner import TRAIN_DONE
    from kvlab.harness.contain import run_contained
    from kvlab.train.checkpointing import has_checkpoint

    evaluate = write_eval_inputs(cell, data_dir, cell_dir / INPUTS_DIR)
    model_cfg = substrate_config(cell, data_dir)
    run_dir = out_dir / "runs" / cell.train_key
    common = dict(extra=spec.config, measure=True, generate=bool(cell.eval.get("speed", True)),
                  device=device, evaluate=evaluate, data_dir=data_dir)  # fmt: skip
    trained = not (run_dir / TRAIN_DONE).is_file()
    if trained:
        outcome = run_contained(
            spec.path, run_dir, model_cfg, limits, train={**cell.train, "device": device},
            resume=has_checkpoint(run_dir), **common,
        )  # fmt: skip
        train = outcome.result.get("train")
        if isinstance(train, dict):  # it trained: later regimes reuse the run even if evaluation failed
            train_s = _number(train.get("elapsed_s"))
            write_json(run_dir / TRAIN_DONE, {"train_s": train_s, **cell.config()})
            log(f"    trained contained ({train_s or 0:.1f}s of training) -> runs/{cell.train_key}")
    else:
        weights = run_dir / "model.safetensors"
        outcome = run_contained(spec.path, cell_dir / CONTAINED_DIR, model_cfg, limits,
                                weights=str(weights), **common)  # fmt: skip
    if outcome.verdict != "ok":
        lines = outcome.line.splitlines()
        shown = "; ".join(lines[1:4]) + (f"; ... ({len(lines) - 4} more)" if len(lines) > 4 else "")
        details = f"{outcome.line}\n\n--- the contained run's output (tail) ---\n{outcome.output}"
        (cell_dir / OUTPUT_FILE).write_text(details)
        raise AttentionFileFailed(lines[0] + (f": {shown}" if shown else ""), details)
    return cell_metrics(outcome.result, spec, cell.model["attention_file"]["sha256"]), trained


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cell_metrics(result: dict[str, Any], spec: AttentionFile, sha256: str) -> dict[str, Any]:
    """A cell's metrics from the child's report (which the submission's process wrote: read as data)."""
    evaluation = result.get("evaluation")
    if not isinstance(evaluation, dict):
        raise AttentionFileFailed("crashed: the contained run reported no evaluation")
    metrics = dict(evaluation)
    measured = result.get("measured") if isinstance(result.get("measured"), dict) else {}
    cache = result.get("cache") if isinstance(result.get("cache"), dict) else {}
    flags = [str(f)[:300] for f in (result.get("kv_flags") or [])][:MAX_FLAGS]
    if measured.get("measured"):  # the rank of the K/V handed to SDPA (harness.metrics.measure_kv)
        metrics["kv_measured_bytes_per_token"] = _number(measured.get("kv_bytes_per_token"))
    if cache.get("interface") and not cache.get("error"):  # the file's own cache (harness.cached)
        metrics["file_cache_bytes_per_token"] = _number(cache.get("kv_bytes_per_token"))
    metrics["kv_mismatches"] = sum(f.startswith("MISMATCH") for f in flags)
    metrics["kv_notes"] = sum(f.startswith("note") for f in flags)
    generation = result.get("generation") if isinstance(result.get("generation"), dict) else {}
    if generation:
        metrics["generation_toks_per_s"] = _number(generation.get("generation_toks_per_s"))
        nocache = generation.get("nocache_toks_per_s")
        if nocache is None and str(generation.get("method", "")).startswith("seed-000"):
            nocache = generation.get("generation_toks_per_s")
        metrics["nocache_toks_per_s"] = _number(nocache)
    metrics["attention_file"] = {
        "path": str(spec.path),
        "sha256": sha256,
        "region_sha256": str(result.get("attention_sha256", "")),
        "kv_flags": flags,
        "generation_method": str(generation.get("method", "not timed")),
        "cache": _cache_summary(cache),
    }
    return metrics


def _cache_summary(cache: dict[str, Any]) -> str:
    if not cache.get("interface"):
        return f"none ({str(cache.get('reason', 'not checked'))[:200]})"
    if cache.get("error"):
        return str(cache["error"])[:300]
    same = "decodes as" if cache.get("decode_matches_full") else "DIFFERS from"
    return f"kvlab's cache interface; cached decoding {same} the full forward"


def declared_row(spec: AttentionFile, model_cfg: ModelConfig) -> dict[str, Any]:
    """--dry-run's row: the file's declared figures from a contained build (meta device); or its verdict."""
    from kvlab.harness.contain import Limits, run_contained

    with tempfile.TemporaryDirectory(prefix="kvlab-declare-") as tmp:
        outcome = run_contained(
            spec.path, Path(tmp) / "run", model_cfg, Limits(**DECLARE_LIMITS), extra=spec.config,
            measure=False, declare_only=True,
        )  # fmt: skip
    kv = outcome.result.get("kv_metrics")
    if outcome.verdict != "ok" or not isinstance(kv, dict):
        return {"error": outcome.line if outcome.verdict != "ok" else "crashed: no figures reported"}
    row = {k: _number(v) for k, v in kv.items()}
    row["params_M"] = (_number(outcome.result.get("params")) or 0.0) / 1e6
    if any(v is None for v in row.values()):
        return {"error": "crashed: the contained build reported figures that are not numbers"}
    return row


def summary_lines(row: dict[str, Any]) -> list[str]:
    """results.md lines for one attention-file row (aggregate's attention_file entry)."""
    info = row.get("attention_file") or {}
    m = row["metrics"]

    def value(key: str) -> str:
        stat = m.get(key)
        return "–" if stat is None else f"{stat['mean']:g}"

    lines = [
        f"- **{row['method']}** ({row['regime']}): `{info.get('path')}` "
        f"(sha256 {str(info.get('sha256'))[:16]}); "
        f"KV B/token declared (seed-000 formula) {value('kv_bytes_per_token')}, measured K/V "
        f"{value('kv_measured_bytes_per_token')}, the file's cache {value('file_cache_bytes_per_token')}; "
        f"cache: {info.get('cache')}; generation: {info.get('generation_method')}",
    ]
    lines += [f"  - {flag}" for flag in info.get("kv_flags", [])]
    return lines
