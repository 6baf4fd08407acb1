"""Seed 000's harness: attention files (template, AST boundary), the frozen substrate, metrics, containment.

`kvlab init-attention FILE --from gqa` writes a file; `kvlab validate FILE` checks its region;
`kvlab train --attention-file FILE --out RUN` trains it in a contained child process.
"""

from kvlab.harness.loader import AttentionLoadError, SeedGPT, build_seed_model, load_attention
from kvlab.harness.metrics import declared_metrics, measure_kv
from kvlab.harness.template import AttentionFileError, init_attention, read_region, template_text
from kvlab.harness.validate import Violation, validate_file

__all__ = [
    "AttentionFileError",
    "AttentionLoadError",
    "SeedGPT",
    "Violation",
    "build_seed_model",
    "declared_metrics",
    "init_attention",
    "load_attention",
    "measure_kv",
    "read_region",
    "template_text",
    "validate_file",
]
