"""The seed-000 training loop: `train(model_cfg, train_cfg, data_dir, out_dir, ...) -> run_dir`.

Reads top to bottom like nanoGPT's train.py: build the model, the AdamW groups and the seeded batch
generator; each step runs the hooks, accumulates gradients over micro-batches under autocast, clips and
steps; every `eval_interval` steps it measures val loss, appends metrics.jsonl and checkpoints atomically.
The same function runs single-process or as one torchrun DDP rank.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kvlab.attention.rope import reserve_rope
from kvlab.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    live_model_config,
    load_model,
    run_config,
    write_json,
)
from kvlab.config import ModelConfig, TrainConfig
from kvlab.errors import KvlabError
from kvlab.model import GPT
from kvlab.train import checkpointing as ckpt
from kvlab.train.batches import (
    VAL_SEED_OFFSET,
    make_batch,
    open_split,
    rank_slices,
    read_meta,
    sample_offsets,
    val_loss,
)
from kvlab.train.distributed import DistContext, init_distributed, resolve_device
from kvlab.train.optim import GroupRule, Trainable, configure_optimizer, lr_at, select_trainable
from kvlab.train.rundir import (
    _save_tokenizer,
    check_resume_config,
    data_record,
    diverging_warning,
    prepare_run_dir,
    resolve_vocab,
)
from kvlab.train.terms import (
    Hook,
    LossTerm,
    default_terms,
    distillation_terms,
    fused_cross_entropy_applies,
    micro_batch_loss,
)

HOOK_SEED_OFFSET = 1


class TrainingDiverged(KvlabError):
    """The loss became NaN/inf; the run stopped and its last good checkpoint is untouched."""


def _source_model(init_from: str | Path | nn.Module) -> nn.Module:
    return init_from if isinstance(init_from, nn.Module) else load_model(init_from)


def _autocast(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext, "float32"
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), dtype


def estimate_val_loss(model, tokens, cfg: TrainConfig, block_size, device, autocast, ctx: DistContext):
    """The run's val loss: batches from a generator seeded train.seed + VAL_SEED_OFFSET (every time)."""
    gen = torch.Generator().manual_seed(cfg.seed + VAL_SEED_OFFSET)
    return val_loss(
        model,
        tokens,
        block_size,
        cfg.batch_size,
        cfg.eval_iters,
        gen,
        autocast,
        ctx.rank,
        ctx.world,
        ctx.all_reduce_sum,
    )


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: JSON lines are the record
        return None
    return SummaryWriter(str(run_dir / "tb"))


def train(
    model_cfg: ModelConfig | None,
    train_cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    loss_terms: Sequence[LossTerm] | None = None,
    teacher: nn.Module | None = None,
    init_from: str | Path | nn.Module | None = None,
    trainable: Trainable = None,
    progress: bool = True,
    hooks: Sequence[Hook] = (),
    group_rule: GroupRule | None = None,
    model_factory: Callable[[ModelConfig], nn.Module] | None = None,
    run_info: dict[str, Any] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
) -> Path:
    """Train (or continue with resume=True) and return the run directory.

    loss_terms: weighted terms (default: cross-entropy; with a teacher: 0.25 KL + 0.75 CE).
    init_from: a run directory or a GPT whose weights start the run (uptraining); model_cfg None = its config.
    trainable: glob patterns / name fragments / predicate on parameter names; everything else is frozen.
    hooks: callables (model, generator) run before every step, e.g. Matryoshka rank sampling.
    group_rule: parameter name -> (lr multiplier, decay allowed), for per-group learning rates.
    model_factory: builds the model from the resolved config instead of GPT (seed 000's substrate around an
    attention file: kvlab.harness); it must expose `config` and `forward(idx) -> logits`.
    run_info: extra fields recorded under "run" in config.json.
    overwrite: replace the checkpoints of an earlier run in out_dir (refused otherwise: nothing is lost).
    allow_changes: resume although train fields differ from config.json (they are named and recorded).
    """
    ctx = init_distributed(train_cfg.device)
    try:
        return _train(
            ctx,
            model_cfg,
            train_cfg,
            Path(data_dir),
            Path(out_dir),
            resume,
            loss_terms,
            teacher,
            init_from,
            trainable,
            progress,
            list(hooks),
            group_rule,
            model_factory,
            run_info or {},
            overwrite,
            allow_changes,
        )
    finally:
        ctx.close()


def _train(
    ctx,
    model_cfg,
    cfg,
    data_dir,
    run_dir,
    resume,
    loss_terms,
    teacher,
    init_from,
    trainable,
    progress,
    hooks,
    group_rule,
    model_factory,
    run_info,
    overwrite=False,
    allow_changes=False,
) -> Path:
    device = resolve_device(cfg.device, ctx)
    autocast, amp_dtype = _autocast(device, cfg.dtype)
    meta = read_meta(data_dir)
    source = _source_model(init_from) if init_from is not None else None
    if model_cfg is None:
        if source is None:
            raise KvlabError("train() needs model_cfg, or init_from to take the model config from")
        model_cfg = source.config
    model_cfg = resolve_vocab(model_cfg, meta, fixed=source is not None)
    T = model_cfg.block_size
    train_tokens = open_split(data_dir, "train", meta, T)
    val_tokens = open_split(data_dir, "val", meta, T)
    if cfg.grad_accum % ctx.world:
        raise KvlabError(
            f"train.grad_accum={cfg.grad_accum} must be a multiple of the {ctx.world} DDP processes "
            "(each rank takes every world-th micro-batch of the global batch)"
        )

    # ---- model, optimiser, generators (same seed on every rank: identical init and batches) ----
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg) if model_factory is None else model_factory(model_cfg)
    if source is not None:
        try:
            model.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise KvlabError(
                f"init_from weights do not fit the model config: {str(e).splitlines()[0]}"
            ) from e
        del source
    trainable_names = select_trainable(model, trainable)
    model.to(device)
    optimizer = configure_optimizer(model, cfg, device.type, group_rule)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    hook_gen = torch.Generator().manual_seed(cfg.seed + HOOK_SEED_OFFSET)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    terms = (
        list(loss_terms)
        if loss_terms is not None
        else (distillation_terms(teacher) if teacher is not None else default_terms())
    )

    extra = {
        "train": cfg.to_dict(),
        "data": data_record(data_dir, meta),
        "run": {
            "world_size": ctx.world,
            "device": str(device),
            "autocast_dtype": amp_dtype,
            "loss_terms": [{"name": t.name, "weight": t.weight} for t in terms],
            "trainable": None if trainable is None else trainable_names,
            "init_from": None if init_from is None or isinstance(init_from, nn.Module) else str(init_from),
            **run_info,
        },
    }
    step, elapsed_before, best_val, last_val = 0, 0.0, math.inf, None
    if ctx.is_main:
        prepare_run_dir(run_dir, resume, overwrite)
    if resume:
        state = ckpt.load_resume_state(run_dir)
        changed = check_resume_config(
            run_dir, live_model_config(model), cfg.to_dict(), allow_changes, extra["data"]
        )
        if changed and ctx.is_main:
            write_json(run_dir / CONFIG_FILE, {**run_config(model, extra), "resumed_with_changes": changed})
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            reason = str(e).splitlines()[0]
            raise CheckpointError(
                f"{run_dir / ckpt.RESUME_FILE} does not match this model/train config ({reason})"
            ) from e
        ckpt.restore_rng_states(state["rng"], batch_gen, hook_gen)
        step, elapsed_before = state["step"], state["elapsed_s"]
        best_val, last_val = state["best_val_loss"], state["val_loss"]
    elif ctx.is_main:
        _save_tokenizer(data_dir, run_dir)
        write_json(run_dir / CONFIG_FILE, run_config(model, extra))
    ctx.barrier()

    raw_model = model
    if cfg.compile:
        # RoPE tables first built inside the compiled forward would recompile it at the next call
        dtype = next(raw_model.parameters()).dtype if amp_dtype == "float32" else torch.bfloat16  # autocast
        reserve_rope(raw_model, T, device, dtype)
        model = torch.compile(model)
    if ctx.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    writer = _tensorboard(run_dir, cfg.tensorboard) if ctx.is_main else None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * T
    bar = tqdm(
        total=cfg.max_iters,
        initial=step,
        disable=not (progress and ctx.is_main),
        unit="step",
        dynamic_ncols=True,
        desc=run_dir.name,
    )

    # ---- the loop ------------------------------------------------------------------------------
    fused_ce = fused_cross_entropy_applies(terms, raw_model, device, amp_dtype)
    model.train()
    start = time.perf_counter()
    window_losses, window_train_s, window_t0 = [], 0.0, time.perf_counter()
    warned = False
    while step < cfg.max_iters:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        for hook in hooks:
            hook(raw_model, hook_gen)
        offsets = sample_offsets(batch_gen, cfg.grad_accum * cfg.batch_size, len(train_tokens), T)
        micro = rank_slices(offsets, cfg.batch_size, ctx.rank, ctx.world)
        step_loss = torch.zeros((), device=device)
        for i, off in enumerate(micro):
            x, y = make_batch(train_tokens, off, T, device)
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            sync = nullcontext() if not ctx.enabled or i == len(micro) - 1 else model.no_sync()
            with sync:
                with autocast():
                    loss = micro_batch_loss(model, raw_model, terms, x, y, fused_ce)
                # Local mean over this rank's micro-batches; DDP averages ranks -> mean over the global batch.
                (loss / len(micro)).backward()
            step_loss += loss.detach() / len(micro)
        loss_value = (ctx.all_reduce_sum(step_loss) / ctx.world).item()
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(_diverged_message("train loss", loss_value, step, run_dir, last_val, cfg))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in raw_model.parameters() if p.requires_grad], cfg.grad_clip
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_losses.append(loss_value)
        bar.update(1)
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            dt = time.perf_counter() - window_t0
            bar.set_postfix(
                loss=f"{loss_value:.3f}", tok_s=f"{len(window_losses) * tokens_per_step / dt:.0f}"
            )
        if step % cfg.eval_interval and step != cfg.max_iters:
            continue

        # ---- evaluate + checkpoint ----
        window_train_s = time.perf_counter() - window_t0
        for hook in hooks:  # e.g. Matryoshka: score and save at the target ranks, not the last sampled
            before_eval = getattr(hook, "before_eval", None)
            if before_eval is not None:
                before_eval(raw_model)
        val = estimate_val_loss(raw_model, val_tokens, cfg, T, device, autocast, ctx)
        if not math.isfinite(val):
            raise TrainingDiverged(_diverged_message("val loss", val, step, run_dir, last_val, cfg))
        last_val, best_val = val, min(best_val, val)
        record = {
            "step": step,
            "tokens": step * tokens_per_step,
            "train_loss": sum(window_losses) / len(window_losses),
            "val_loss": val,
            "lr": lr,
            "tokens_per_s": len(window_losses) * tokens_per_step / window_train_s,
            "elapsed_s": elapsed_before + time.perf_counter() - start,
        }
        if ctx.is_main:
            warning = None if warned else diverging_warning(val, model_cfg.vocab_size, step, cfg.lr)
            if warning:
                print(warning, file=sys.stderr)
                warned = True
            ckpt.commit_checkpoint(
                run_dir,
                step,
                raw_model,
                {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "rng": ckpt.rng_states(batch_gen, hook_gen),
                    "val_loss": val,
                    "best_val_loss": best_val,
                    "elapsed_s": record["elapsed_s"],
                },
                record,
            )
            if writer is not None:
                for key in ("train_loss", "val_loss", "lr", "tokens_per_s"):
                    writer.add_scalar(key, record[key], step)
                writer.flush()
        bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val:.3f}")
        ctx.barrier()
        window_losses, window_t0 = [], time.perf_counter()
    bar.close()
    if writer is not None:
        writer.close()
    return run_dir


def _diverged_message(what, value, step, run_dir, last_val, cfg: TrainConfig) -> str:
    kept = (
        f"the last good checkpoint in {run_dir} (val_loss {last_val:.4f}) is intact"
        if last_val is not None
        else f"no checkpoint was written before it (first evaluation at step {cfg.eval_interval})"
    )
    return (
        f"{what} became {value} at step {step + 1}; training stopped and {kept}. "
        f"Lower train.lr (now {cfg.lr:g}) or check the loss terms"
    )
