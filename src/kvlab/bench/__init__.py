"""The benchmark: suites of methods x regimes x seeds, trained and evaluated with resume by config hash,
reported as results.json, results.md and pareto.png (`kvlab bench`, `kvlab demo`)."""

from kvlab.bench.plan import Cell, config_hash, format_plan, plan_cells
from kvlab.bench.plot import pareto_front
from kvlab.bench.report import aggregate, write_reports
from kvlab.bench.runner import Backend, BenchResult, KvlabBackend, run_bench
from kvlab.bench.suites import Regime, Suite, SuiteError, builtin_suites, load_suite, parse_suite

__all__ = [
    "Backend",
    "BenchResult",
    "Cell",
    "KvlabBackend",
    "Regime",
    "Suite",
    "SuiteError",
    "aggregate",
    "builtin_suites",
    "config_hash",
    "format_plan",
    "load_suite",
    "pareto_front",
    "parse_suite",
    "plan_cells",
    "run_bench",
    "write_reports",
]
