"""Evaluation: losses and perplexities (lm), last-word accuracy (cloze), measured costs (speed), and
`evaluate`, which gathers every metric of design.md for one run."""

from kvlab.eval.cloze import cloze_set_from_documents, lambada_metrics, split_cloze
from kvlab.eval.corpora import HeldoutCorpus, resolve_corpus
from kvlab.eval.lm import (
    EvalError,
    document_perplexity,
    heldout_loss,
    loglikelihood_tokens,
    perplexity_from_loglikelihoods,
    rolling_loglikelihood,
    val_loss,
)
from kvlab.eval.report import CONTRACT_KEYS, evaluate, format_report
from kvlab.eval.speed import generation_speed, measure_cache_bytes, nocache_speed, peak_generation_memory

__all__ = [
    "CONTRACT_KEYS",
    "EvalError",
    "HeldoutCorpus",
    "cloze_set_from_documents",
    "document_perplexity",
    "evaluate",
    "format_report",
    "generation_speed",
    "heldout_loss",
    "lambada_metrics",
    "loglikelihood_tokens",
    "measure_cache_bytes",
    "nocache_speed",
    "peak_generation_memory",
    "perplexity_from_loglikelihoods",
    "resolve_corpus",
    "rolling_loglikelihood",
    "split_cloze",
    "val_loss",
]
