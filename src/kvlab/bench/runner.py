"""Run a bench: train and evaluate every cell of a suite, reusing finished cells, then write the report.

Layout of OUT: `runs/<train_key>/` is a training run directory (shared by regimes that train the same
model; with a pretrained [source], an uptraining run whose `step0/` holds the converted model before
training, scored too), `cells/<key>/eval.json` is one finished cell (metrics + resolved config). A cell
is done iff its eval.json exists, and a run is done iff its `bench_train.json` exists, so an interrupted
bench, rerun, trains only what is missing. The work itself goes through a `Backend` (data, train,
uptrain, eval), which tests replace with a cheap fake.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvlab.bench.plan import Cell, plan_cells
from kvlab.bench.suites import Suite
from kvlab.checkpoint import environment_info, write_json
from kvlab.config import ModelConfig
from kvlab.errors import KvlabError

TRAIN_DONE = "bench_train.json"  # written into a run dir once training returned
EVAL_FILE = "eval.json"
STEP0_DIR = "step0"  # in an uptraining run: the converted model before its first step
STEP0_KEYS = ("val_loss", "heldout_loss", "heldout_losses", "tasks")  # what a cell keeps of step 0


class Backend(Protocol):
    """What the runner needs from the rest of kvlab; `KvlabBackend` is the real one."""

    def prepare(self, data: dict[str, Any]) -> Path: ...

    def train(
        self, model_cfg: ModelConfig, train_cfg: dict[str, Any], data_dir: Path, out_dir: Path
    ) -> Path: ...

    def evaluate(
        self, run_dir: Path, heldout: str | tuple[str, ...], data_dir: Path, **options
    ) -> dict[str, Any]: ...

    def uptrain(self, spec: dict[str, Any], train_cfg: dict[str, Any], data_dir: Path, out_dir: Path) -> Path:
        """Convert spec["pretrained"] by spec["to"], save it untrained in out_dir/step0, uptrain."""
        ...


class KvlabBackend:
    """kvlab.data.prepare -> kvlab.train.train -> kvlab.eval.evaluate (imported late: optional parts)."""

    def prepare(self, data: dict[str, Any]) -> Path:
        from kvlab.data import prepare

        return Path(prepare(**data))

    def train(self, model_cfg: ModelConfig, train_cfg: dict[str, Any], data_dir: Path, out_dir: Path) -> Path:
        from kvlab.config import TrainConfig
        from kvlab.train import train
        from kvlab.train.checkpointing import has_checkpoint

        # a run killed after its first checkpoint continues from it instead of restarting
        return Path(
            train(
                model_cfg,
                TrainConfig.from_dict(train_cfg),
                data_dir,
                out_dir,
                resume=has_checkpoint(Path(out_dir)),
                progress=sys.stderr.isatty(),
            )
        )

    def uptrain(self, spec: dict[str, Any], train_cfg: dict[str, Any], data_dir: Path, out_dir: Path) -> Path:
        from kvlab.retrofit.source import load_source
        from kvlab.retrofit.uptrain import check_block_size, uptrain

        source, desc, source_dir = load_source(spec["pretrained"]["from"], flag="source.from")
        uptrain(
            check_block_size(source, spec.get("block_size")), spec["to"], data_dir, out_dir,
            recipe=spec["recipe"], train_overrides=train_cfg, resume=True, source_desc=desc,
            source_dir=source_dir, phase1_iters=spec.get("phase1_iters"),
            n_calibration=spec["pretrained"]["calibration"], progress=sys.stderr.isatty(),
            step0_dir=Path(out_dir) / STEP0_DIR, search_after=spec.get("search_after", False),
        )  # fmt: skip
        return Path(out_dir)

    def evaluate(
        self, run_dir: Path, heldout: str | tuple[str, ...], data_dir: Path, **options
    ) -> dict[str, Any]:
        from kvlab.eval import evaluate

        corpora = [heldout] if isinstance(heldout, str) else list(heldout)
        if not options.pop("word_perplexity", True):
            # Rolling word/byte perplexity over whole held-out documents dominates CPU evaluation (~80%
            # of a cpu-tiny cell); a suite may skip it and keep heldout_loss and cloze accuracy.
            from kvlab.checkpoint import read_config
            from kvlab.data import load_tokenizer
            from kvlab.eval.corpora import resolve_corpus

            data_cfg = read_config(run_dir).get("data") or {}
            tokenizer = load_tokenizer(run_dir)
            corpora = [resolve_corpus(name, data_cfg.get("dir"), tokenizer) for name in corpora]
            for corpus in corpora:
                corpus.documents = None
        return evaluate(run_dir, heldout=corpora, **options)


@dataclass
class BenchResult:
    out_dir: Path
    results: list[dict[str, Any]]  # one eval.json per finished cell
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"cell": label, "error": ...}
    trained: int = 0  # training runs executed by this call (0 when everything was reused)
    evaluated: int = 0


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def run_bench(
    suite: Suite,
    out_dir: str | Path,
    backend: Backend | None = None,
    log=print,
    write_report: bool = True,
) -> BenchResult:
    """Train and evaluate every cell of `suite` under out_dir, then write results.json/.md and pareto.png.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: all ranks train each run together (DDP), rank 0
    alone prepares the data, evaluates, logs and writes (kvlab.bench.ranks); all ranks return the same
    failed cells, rank 0 alone the results."""
    from kvlab.bench.ranks import Ranks

    cells = plan_cells(suite)
    ranks = Ranks(str(cells[0].train.get("device", "auto")))
    try:
        return _run_bench(suite, Path(out_dir), backend or KvlabBackend(), log, write_report, cells, ranks)
    finally:
        ranks.close()


def _run_bench(suite, out_dir: Path, backend: Backend, log, write_report: bool, cells, ranks) -> BenchResult:
    main = ranks.is_main
    log = log if main else (lambda msg: None)

    def plan() -> list[str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            out_dir / "suite.json",
            {
                "name": suite.name,
                "source": suite.source,
                "seeds": list(suite.seeds),
                "cells": [{"label": c.label, "key": c.key} for c in cells],
            },
        )
        return [c.key for c in cells if not (out_dir / "cells" / c.key / EVAL_FILE).is_file()]

    todo_keys = set(ranks.from_main(plan))
    todo = [c for c in cells if c.key in todo_keys]
    workers = f" ({ranks.world} ranks train together; rank 0 evaluates)" if ranks.world > 1 else ""
    log(
        f"bench {suite.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
        f"{len(todo)} to run -> {out_dir}{workers}"
    )
    result = BenchResult(out_dir=out_dir, results=[])
    data_dir = ranks.from_main(lambda: backend.prepare(suite.data)) if todo else None
    start = time.perf_counter()
    for n, cell in enumerate(todo, 1):
        t0 = time.perf_counter()
        log(f"[{n}/{len(todo)}] {cell.label}  (cell {cell.key})")
        try:
            did_train = _run_cell(cell, out_dir, backend, data_dir, log, suite.methods[cell.method], ranks)
            result.trained += did_train
            result.evaluated += 1
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one broken method must not lose the rest of a long bench
            # a user-facing error (an attention file's verdict line, a bad config) reads as it is
            err = str(e) if isinstance(e, KvlabError) else f"{type(e).__name__}: {e}"
            log(f"    FAILED: {err} (traceback in cells/{cell.key}/error.txt)")
            if main:
                cell_dir = out_dir / "cells" / cell.key
                cell_dir.mkdir(parents=True, exist_ok=True)
                details = getattr(e, "details", "")  # an attention file's verdict and output tail
                text = traceback.format_exc() + (f"\n{details}\n" if details else "")
                (cell_dir / "error.txt").write_text(text)
            result.failed.append({"cell": cell.label, "key": cell.key, "error": err})
        elapsed = time.perf_counter() - start
        eta = elapsed / n * (len(todo) - n)
        log(
            f"    cell {time.perf_counter() - t0:.1f}s | progress {n}/{len(todo)} "
            f"({100 * n / len(todo):.0f}%) | elapsed {_fmt_s(elapsed)} | ~{_fmt_s(eta)} left"
        )
    if main:
        result.results = load_results(out_dir, cells)
        if write_report:
            from kvlab.bench.report import write_reports

            write_reports(suite, result.results, out_dir, failed=result.failed)
    return result


def _run_cell(cell: Cell, out_dir: Path, backend: Backend, data_dir: Path, log, spec, ranks) -> bool:
    """Train (unless the run already exists) and evaluate one cell; True if it trained. Under torchrun
    every rank trains, rank 0 alone decides, evaluates and writes (ranks.from_main)."""
    run_dir = out_dir / "runs" / cell.train_key
    if cell.attention_file is not None:  # untrusted code: trained and evaluated in contained children
        from kvlab.bench.files import run_file_cell

        def contained() -> bool:
            t0 = time.perf_counter()
            metrics, trained = run_file_cell(cell, spec, out_dir, data_dir, log)
            return _record(cell, out_dir, metrics, time.perf_counter() - t0, log, trained)

        return ranks.from_main(contained)  # a single contained child, started by rank 0
    train_s = None
    if ranks.from_main(lambda: not (run_dir / TRAIN_DONE).is_file()):
        t0 = time.perf_counter()
        if "pretrained" in cell.model:
            backend.uptrain(cell.model, cell.train, data_dir, run_dir)
        else:
            backend.train(ModelConfig.from_dict(cell.model), cell.train, data_dir, run_dir)
        train_s = time.perf_counter() - t0
    return ranks.from_main(lambda: _evaluate_cell(cell, out_dir, backend, data_dir, log, train_s))


def _evaluate_cell(cell: Cell, out_dir: Path, backend: Backend, data_dir: Path, log, train_s) -> bool:
    run_dir = out_dir / "runs" / cell.train_key
    if train_s is not None:
        write_json(run_dir / TRAIN_DONE, {"train_s": train_s, **cell.config()})
        log(f"    trained in {train_s:.1f}s -> runs/{cell.train_key}")
    t0 = time.perf_counter()
    scored = run_dir
    if cell.model.get("search_after"):  # the trained model at the ranks searched after training
        from kvlab.retrofit.uptrain import SEARCHED_DIR

        scored = run_dir / SEARCHED_DIR
    metrics = backend.evaluate(scored, cell.heldout, data_dir, **cell.eval)
    if "pretrained" in cell.model:  # the same evaluation of the converted model before uptraining
        step0 = backend.evaluate(run_dir / STEP0_DIR, cell.heldout, data_dir, **cell.eval)
        metrics["step0"] = {k: step0[k] for k in STEP0_KEYS if k in step0}
    return _record(cell, out_dir, metrics, time.perf_counter() - t0, log, train_s is not None)


def _record(cell: Cell, out_dir: Path, metrics: dict[str, Any], eval_s: float, log, trained: bool) -> bool:
    """Write the cell's eval.json (last: its existence marks the cell done); returns `trained`."""
    try:
        train_s = json.loads((out_dir / "runs" / cell.train_key / TRAIN_DONE).read_text()).get("train_s")
    except (OSError, ValueError, AttributeError):  # an attention file's run whose training failed
        train_s = None
    summary = ", ".join(
        f"{k} {metrics[k]:.4g}" for k in ("val_loss", "heldout_loss") if isinstance(metrics.get(k), float)
    )
    if "heldout_loss" in metrics.get("step0", {}):
        summary += f" (step 0: heldout_loss {metrics['step0']['heldout_loss']:.4g})"
    log(f"    evaluated in {eval_s:.1f}s: {summary}")
    record = {
        "method": cell.method,
        "regime": cell.regime,
        "seed": cell.seed,
        "key": cell.key,
        "train_key": cell.train_key,
        "run_dir": f"runs/{cell.train_key}",
        "train_s": train_s,
        "eval_s": eval_s,
        "metrics": metrics,
        "config": cell.config(),
        "environment": environment_info(),  # the commit, versions and machine that produced the cell
    }
    (out_dir / "cells" / cell.key / "error.txt").unlink(missing_ok=True)  # an earlier attempt's
    write_json(out_dir / "cells" / cell.key / EVAL_FILE, record)  # last: its existence marks the cell done
    return trained


def load_results(out_dir: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """The eval.json of every finished cell of the plan, labelled with this suite's method/regime names."""
    results = []
    for c in cells:
        path = out_dir / "cells" / c.key / EVAL_FILE
        if path.is_file():
            rec = json.loads(path.read_text())
            rec.update(method=c.method, regime=c.regime, seed=c.seed)  # names may differ from the run's
            results.append(rec)
    return results


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
