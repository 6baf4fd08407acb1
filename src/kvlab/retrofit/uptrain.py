"""`uptrain`: convert a pretrained model to a KV structure, measure it at step 0, train it, measure again.

Recipes (seeds 001-003): "ce" (MLKV: cross-entropy, lr 6e-4, cosine, warmup 0.2); "distill" (MatryoshkaKV:
0.25 KL(teacher || student) + 0.75 CE against the frozen source, per-step random Matryoshka ranks, the
projections at 20x the base lr 5e-5 and undecayed); "oacd" (Context-KV: phase 1 trains only the
ContextBlock on the OACD loss into OUT/phase1, phase 2 freezes it and trains the rest with CE into OUT).
`control=True` also trains the unreduced source with the same data, budget, seed and recipe into
OUT/control, so the summary separates the cost of the reduction from the effect of more training.
`search_after=True` (a structure ending in `search:B`) is MatryoshkaKV's order: train the structure before
the search (at its ranks, with the distill recipe's sampled ranks), then run the search from full rank on
the trained model into OUT/searched, which is what the summary scores; step 0 scores the search applied
at conversion, the same structure at the same bytes before training.

Every check (structure, data, tokenizer, teacher) and the conversion happen before anything is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kvlab.attention.context import context_layers
from kvlab.attention.matryoshka import RankSampler, get_ranks, matryoshka_layers
from kvlab.checkpoint import load_model, read_config, write_json
from kvlab.config import ConfigError, TrainConfig
from kvlab.errors import KvlabError
from kvlab.losses import oacd_term
from kvlab.model import GPT
from kvlab.retrofit.structures import convert, split_final_search
from kvlab.train.batches import make_batch, open_split, read_meta, sample_offsets
from kvlab.train.checkpointing import RESUME_FILE, read_metrics
from kvlab.train.loop import VAL_SEED_OFFSET, train
from kvlab.train.rundir import resolve_vocab, save_untrained
from kvlab.train.terms import LossTerm, default_terms, distillation_terms

RECIPES = ("ce", "distill", "oacd")
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "ce": dict(lr=6e-4, warmup_frac=0.2),  # seed 002 (MLKV uptraining)
    "distill": dict(lr=5e-5, warmup_frac=0.2),  # seed 003's base lr; projections x20 = 1e-3
    "oacd": dict(lr=6e-4, warmup_frac=0.2),  # seed 001 gives no schedule: the ce recipe's
}
PROJECTION_LR_SCALE = 20.0  # MatryoshkaKV: 1e-3 for the projections vs 5e-5 for the base
SUMMARY_FILE = "uptrain.json"
SEARCHED_DIR = "searched"  # search_after: the trained model at the ranks searched after training


class UptrainError(KvlabError):
    """An uptraining request kvlab cannot carry out; the message names the problem and the fix."""


def check_tokenizer(source_dir: Path | None, data_dir: Path, meta: dict[str, Any], model: GPT) -> None:
    """The data must be tokenized like the source (a kvlab run, or an HF model directory holding its
    tokenizer) and its ids must fit the model's vocabulary. When both tokenizers are on disk they are
    compared by content (kvlab.data.same_tokenizer: names may differ, `smollm2-135m` and `hf:DIR` can be
    one tokenizer); otherwise the names the run and the data record must agree."""
    resolve_vocab(model.config, meta, fixed=True)  # one-line DataError when the ids do not fit
    if source_dir is None:
        return
    from kvlab.data import same_tokenizer

    config = read_config(source_dir)
    is_run = "model" in config
    want = (config.get("data") or {}).get("tokenizer") if is_run else f"the tokenizer in {source_dir}"
    got = meta.get("tokenizer")
    same = same_tokenizer(source_dir, data_dir)
    if same is None:  # one side has no tokenizer files: the names
        same = want is None or want == got
    if not same:
        flag = want if is_run else f"hf:{source_dir}"
        raise UptrainError(
            f"{data_dir} was tokenized with {got!r}, not with {want!r} of the source; prepare the data with "
            f"the source's tokenizer (kvlab data prepare --tokenizer {flag})"
        )


def check_teacher(teacher: GPT, student: GPT) -> None:
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UptrainError(
            f"the teacher's vocab_size={teacher.config.vocab_size} differs from the student's "
            f"{student.config.vocab_size}; distil from the source model (leave --teacher unset)"
        )


@torch.no_grad()
def heldout_loss(model: GPT, tokens: np.ndarray, cfg: TrainConfig, device: str = "cpu") -> float:
    """Mean CE on the same fixed val batches the training loop evaluates (seed + VAL_SEED_OFFSET)."""
    T = model.config.block_size
    gen = torch.Generator().manual_seed(cfg.seed + VAL_SEED_OFFSET)
    offsets = sample_offsets(gen, cfg.eval_iters * cfg.batch_size, len(tokens), T)
    was_training = model.training
    model.eval()
    total = 0.0
    for off in offsets.view(-1, cfg.batch_size):
        x, y = make_batch(tokens, off, T, torch.device(device))
        total += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item()
    model.train(was_training)
    return total / cfg.eval_iters


def calibration_batches(tokens: np.ndarray, cfg: TrainConfig, T: int, n: int) -> list[torch.Tensor]:
    """n (batch_size, T) windows of training text from their own seeded generator (PCA, RoPE selection)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    offsets = sample_offsets(gen, n * cfg.batch_size, len(tokens), T)
    return [make_batch(tokens, off, T, torch.device("cpu"))[0] for off in offsets.view(n, -1)]


def _matryoshka_rule(name: str) -> tuple[float, bool]:
    is_projection = any(f".attn.{p}" in name for p in ("k_skew", "v_skew", "k_mean", "v_mean"))
    return (PROJECTION_LR_SCALE, False) if is_projection else (1.0, True)


def _done(run_dir: Path, iters: int) -> bool:
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    return bool(metrics) and metrics[-1]["step"] >= iters


def _train_recipe(model, teacher, recipe, cfg, data_dir, out, resume, phase1_iters, progress) -> None:
    """Run one recipe into `out` (resuming where a previous call stopped)."""
    start = load_model(out) if resume and (out / RESUME_FILE).is_file() else model
    kw = dict(resume=resume and (out / RESUME_FILE).is_file(), progress=progress)
    if recipe == "ce":
        train(None, cfg, data_dir, out, init_from=start, loss_terms=default_terms(), **kw)
    elif recipe == "distill":
        # random ranks each step; scored and saved at the converted model's (target) ranks
        hooks = [RankSampler(get_ranks(model))] if matryoshka_layers(model) else []
        rule = _matryoshka_rule if matryoshka_layers(model) else None
        terms = distillation_terms(teacher)
        train(None, cfg, data_dir, out, init_from=start, loss_terms=terms, hooks=hooks, group_rule=rule, **kw)
    else:  # oacd: two phases, each a run directory; a finished phase 1 is not rerun
        p1 = out / "phase1"
        p1_cfg = TrainConfig.from_dict({**cfg.to_dict(), "max_iters": phase1_iters})
        if not (resume and _done(p1, phase1_iters)):
            p1_resume = resume and (p1 / RESUME_FILE).is_file()
            train(
                None, p1_cfg, data_dir, p1, init_from=load_model(p1) if p1_resume else model,
                resume=p1_resume, loss_terms=[LossTerm("oacd", oacd_term)], trainable=["*.context_block.*"],
                progress=progress,
            )  # fmt: skip
        first = start if kw["resume"] else load_model(p1)
        train(
            None, cfg, data_dir, out, init_from=first, loss_terms=default_terms(),
            trainable=lambda n: ".context_block." not in n, **kw,
        )  # fmt: skip


def uptrain(
    source: GPT,
    structure: str,
    data_dir: str | Path,
    out_dir: str | Path,
    recipe: str = "ce",
    train_overrides: dict[str, Any] | None = None,
    control: bool = False,
    resume: bool = False,
    source_desc: str = "",
    source_dir: str | Path | None = None,
    teacher: GPT | None = None,
    phase1_iters: int | None = None,
    n_calibration: int = 4,
    progress: bool = False,
    step0_dir: str | Path | None = None,
    search_after: bool = False,
) -> dict[str, Any]:
    """Convert `source` to `structure`, evaluate, train with `recipe`, evaluate; returns the summary that is
    also written to OUT/uptrain.json (source, structure, KV bytes, step-0 and final held-out losses).
    step0_dir: also save the converted model, untrained, as a run directory there (what `kvlab bench`
    scores as step 0 with the same evaluation as the trained run)."""
    if recipe not in RECIPES:
        raise UptrainError(f"--recipe {recipe!r} unknown; use one of {', '.join(RECIPES)}")
    data_dir, out = Path(data_dir), Path(out_dir)
    cfg = TrainConfig.from_dict({**RECIPE_DEFAULTS[recipe], **(train_overrides or {})})
    phase1_iters = phase1_iters or max(1, cfg.max_iters // 4)
    meta = read_meta(data_dir)
    check_tokenizer(Path(source_dir) if source_dir else None, data_dir, meta, source)
    T = source.config.block_size
    val = open_split(data_dir, "val", meta, T)
    calib = calibration_batches(open_split(data_dir, "train", meta, T), cfg, T, n_calibration)
    source = source.float().eval()
    trained_spec, search_spec = split_final_search(structure) if search_after else (structure, None)
    model = convert(source, trained_spec, calib)
    scored = convert(model, search_spec, calib) if search_spec else model  # step 0: at the final bytes
    if recipe == "oacd" and not context_layers(model):
        raise UptrainError(
            f"--recipe oacd trains a ContextBlock but --to {structure!r} has none; add context:0"
        )
    if teacher is not None:
        check_teacher(teacher, model)
    teacher = teacher or source
    if step0_dir is not None and not (Path(step0_dir) / "config.json").is_file():
        save_untrained(step0_dir, scored, cfg, data_dir)
    runs = {"reduced": (model, scored, out, recipe)}
    if control:
        runs["control"] = (source, source, out / "control", "ce" if recipe == "oacd" else recipe)
    summary: dict[str, Any] = {"source": source_desc, "structure": structure, "recipe": recipe}
    if search_after:
        summary["search_after"] = True
    for name, (m, m0, run_dir, r) in runs.items():
        step0 = heldout_loss(m0, val, cfg)
        if not math.isfinite(step0):
            raise UptrainError(f"the {name} model's step-0 loss is {step0}; the conversion is broken")
        _train_recipe(m, teacher, r, cfg, data_dir, run_dir, resume, phase1_iters, progress)
        final_model = load_model(run_dir)  # saved at the target ranks (RankSampler.before_eval)
        record = read_config(run_dir)
        record["uptrain"] = {"source": source_desc, "structure": structure if name == "reduced" else "none",
                             "recipe": r, "step0_loss": step0}  # fmt: skip
        write_json(run_dir / "config.json", record)
        scored_dir, before_search = run_dir, {}
        if name == "reduced" and search_spec:
            before_search["trained_loss"] = heldout_loss(final_model, val, cfg)
            scored_dir = out / SEARCHED_DIR
            final_model = m0 = _search_after(final_model, search_spec, calib, cfg, data_dir, scored_dir)
        summary[name] = {
            "run_dir": str(scored_dir),
            "kv_bytes_per_token": m0.kv_metrics()["kv_bytes_per_token"],
            "step0_loss": step0,
            "final_loss": heldout_loss(final_model, val, cfg),
            "steps": cfg.max_iters,
            **before_search,
        }
    summary["source_loss"] = summary.get("control", {}).get("step0_loss") or heldout_loss(source, val, cfg)
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _search_after(model: GPT, search_spec: str, calib, cfg: TrainConfig, data_dir: Path, out: Path) -> GPT:
    """The search step on the trained model, from full rank (MatryoshkaKV: sampled ranks in training, then
    the search), saved as a run directory `out` that `kvlab eval` scores like the training run."""
    from kvlab.attention.matryoshka import set_ranks

    head_dim = model.config.head_dim
    set_ranks(model, k=head_dim, v=head_dim)
    searched = convert(model.eval(), search_spec, calib)
    save_untrained(out, searched, cfg, data_dir)
    record = read_config(out)
    record["uptrain"] = {"searched_after_training": search_spec, "trained_run": str(out.parent)}
    write_json(out / "config.json", record)
    return searched


def format_table(summary: dict[str, Any]) -> str:
    rows = [("model", "KV B/token", "step-0 loss", "final loss")]
    for name in ("reduced", "control"):
        if name in summary:
            s = summary[name]
            label = summary["structure"] if name == "reduced" else "control (unreduced)"
            if name == "reduced" and summary.get("search_after"):
                label += " (searched after training)"
            rows.append(
                (label, f"{s['kv_bytes_per_token']:.0f}", f"{s['step0_loss']:.4f}", f"{s['final_loss']:.4f}")
            )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def check_block_size(model: GPT, block_size: int | None) -> GPT:
    """Train at a shorter context than the source was built for (RoPE families only)."""
    if block_size is None or block_size == model.config.block_size:
        return model
    if model.config.positions != "rope" and block_size > model.config.block_size:
        raise ConfigError(f"model.block_size={block_size} exceeds the source's learned positions")
    import dataclasses

    new = GPT(dataclasses.replace(model.config, block_size=block_size))
    state = model.state_dict()
    if "wpe.weight" in state:
        state["wpe.weight"] = state["wpe.weight"][:block_size]
    new.load_state_dict(state)
    return new.eval()
