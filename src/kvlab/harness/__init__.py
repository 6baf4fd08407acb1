"""Seed 000's harness: attention files (template, AST boundary), the frozen substrate, metrics, containment.

`kvlab init-attention FILE --from gqa` writes a file; `kvlab validate FILE` checks its region;
`kvlab train --attention-file FILE --out RUN` trains it in a contained child process. A file whose
CausalSelfAttention implements kvlab's cache interface (`cache_interface`) is also decoded through its own
cache, checked against the full forward and measured (`check_cache`).
"""

from kvlab.harness.cached import cache_report, check_cache
from kvlab.harness.loader import (
    AttentionLoadError,
    SeedGPT,
    build_seed_model,
    cache_interface,
    load_attention,
)
from kvlab.harness.metrics import declared_metrics, measure_kv
from kvlab.harness.template import AttentionFileError, init_attention, read_region, template_text
from kvlab.harness.validate import Violation, validate_file

__all__ = [
    "AttentionFileError",
    "AttentionLoadError",
    "SeedGPT",
    "Violation",
    "build_seed_model",
    "cache_interface",
    "cache_report",
    "check_cache",
    "declared_metrics",
    "init_attention",
    "load_attention",
    "measure_kv",
    "read_region",
    "template_text",
    "validate_file",
]
