"""Benchmark suites: what to train and evaluate (model, data, budget, methods, regimes, seeds).

A suite is a TOML file; the built-in ones (`cpu-demo`, `seed-124m`, `smollm2-retrofit`, ...) ship in
`kvlab/bench/suites/`. A method is a kvlab attention structure, a seed-000 attention file
(`{ attention_file = "my_attn.py" }`, trained contained: kvlab.bench.files), or with a [source] a
conversion of a pretrained model (those two kinds: kvlab.bench.methods). This module parses and
validates a suite into a `Suite` and reports every mistake as one `SuiteError` line naming the file, the
field and the fix. The schema is documented in `suites/cpu-demo.toml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.bench.methods import (
    SUITES_DIR,
    AttentionFile,
    Retrofit,
    SuiteError,
    parse_attention_file,
    parse_retrofit,
    parse_source,
    reject_unknown,
)
from kvlab.config import MODEL_PRESETS, AttentionConfig, ConfigError, ModelConfig
from kvlab.errors import KvlabError

try:  # Python >= 3.11; on 3.10 the tomli backport reads the same files
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

DEFAULT_SUITE = "cpu-demo"

_TOP_KEYS = {"suite", "source", "model", "data", "train", "eval", "methods", "regimes"}
_EVAL_KEYS = {
    "limit",
    "speed",
    "nocache",
    "cloze_size",
    "batch_size",
    "eval_iters",
    "word_perplexity",
    "tasks",  # zero-shot tasks (kvlab.eval.tasks), e.g. ["arc_easy", "piqa"]
    "task_limit",  # documents per task (lm-eval's --limit)
}
_SUITE_KEYS = {"name", "description", "seeds", "seed", "pareto_regime"}
_REGIME_KEYS = {"description", "model", "train", "heldout"}


@dataclass(frozen=True)
class Regime:
    """One column group of the results table: how the model is trained and what it is scored on.

    Regimes whose `model`/`train` overrides are equal share one training run per method and seed
    (seed 000's eval-* regimes are the train-ctx1024 model scored on another held-out corpus).
    """

    name: str
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. block_size
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    # corpus scored: "heldout" = the training corpus's held-out split, or a name; several corpora (a
    # tuple) make heldout_loss their unweighted mean, with each corpus's loss kept (seed 000's 345M)
    heldout: str | tuple[str, ...] = "heldout"
    description: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    model_preset: str
    model: dict[str, Any]  # ModelConfig overrides applied to every cell
    data: dict[str, Any]  # kvlab.data.prepare arguments: corpus, tokenizer
    train: dict[str, Any]  # TrainConfig fields (the training budget); `preset` names a train preset
    eval: dict[str, Any]  # kvlab.eval.evaluate options (limit, speed, ...): cheaper CPU evaluations
    # display name -> attention structure or attention file (from scratch) or Retrofit (with a pretrained)
    methods: dict[str, AttentionConfig | AttentionFile | Retrofit]
    regimes: tuple[Regime, ...]
    seeds: tuple[int, ...]
    pareto_regime: str | None = None  # regime plotted first in pareto.png (default: the first)
    source: str = ""  # the file it came from
    # [source]: {"from": run dir | hf:DIR | model name, "calibration": batches} when methods are
    # converted from a pretrained model and uptrained, instead of trained from scratch
    pretrained: dict[str, Any] | None = None

    def with_seeds(self, n: int) -> Suite:
        """The same suite run with n seeds (first seed kept, then consecutive)."""
        if n < 1:
            raise SuiteError(f"--seeds {n}: the number of seeds must be at least 1")
        return dataclasses.replace(self, seeds=tuple(self.seeds[0] + i for i in range(n)))

    def cell_model(self, method: str, regime: Regime) -> dict[str, Any]:
        """What a cell trains, as the dict its hash covers: ModelConfig.to_dict() from scratch, or for a
        [source] suite the pretrained source, the conversion, the recipe and the training context."""
        if self.pretrained is not None:
            return {"pretrained": dict(self.pretrained), **self.methods[method].to_dict(),
                    **self.model, **regime.model}  # fmt: skip
        spec = self.methods[method]
        if isinstance(spec, AttentionFile):  # the substrate's fields and the file's content, not its path
            substrate = self.model_config(method, regime).to_dict()
            substrate.pop("attention")  # the file's CausalSelfAttention replaces kvlab's attention
            try:
                digest = spec.sha256()
            except KvlabError as e:
                raise SuiteError(f"{self.source}: methods.{method}.attention_file: {e}") from e
            return {**substrate, "attention_file": {"sha256": digest, "config": dict(spec.config)}}
        return self.model_config(method, regime).to_dict()

    def model_config(self, method: str, regime: Regime) -> ModelConfig:
        """The resolved model of one method in one regime (suite overrides, then the regime's); for an
        attention file, seed 000's substrate (its attention field unused: the file's module replaces it)."""
        spec = self.methods[method]
        # a file's substrate gets the plain "mha" (never used, not hashed) whatever the preset carries
        attention = "mha" if isinstance(spec, AttentionFile) else spec
        overrides = {**self.model, **regime.model, "attention": attention}
        try:
            cfg = ModelConfig.preset(self.model_preset, **overrides)
        except ConfigError as e:
            raise SuiteError(f"{self.source}: methods.{method} in regime {regime.name!r}: {e}") from e
        if isinstance(spec, AttentionFile) and cfg.family != "gpt2":
            raise SuiteError(
                f"{self.source}: methods.{method}: an attention file runs on seed 000's nanoGPT substrate "
                f"(family gpt2); model.preset={self.model_preset!r} is family {cfg.family!r}"
            )
        return cfg


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def load_suite(name_or_path: str | Path = DEFAULT_SUITE) -> Suite:
    """A built-in suite by name (`cpu-demo`, `seed-124m`) or a user's TOML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path).endswith(".toml") or path.parent != Path("."):
            raise SuiteError(
                f"suite file {path} not found; pass a TOML file or one of: {', '.join(builtin_suites())}"
            )
        path = SUITES_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise SuiteError(
                f"unknown suite {str(name_or_path)!r}; choose one of {', '.join(builtin_suites())} "
                "or pass a .toml file"
            )
    if tomllib is None:  # pragma: no cover - 3.10 without tomli
        raise SuiteError(
            "reading suites needs tomllib (Python >= 3.11) or `pip install tomli` on Python 3.10"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{path}: invalid TOML ({e})") from e
    return parse_suite(raw, source=str(path))


def parse_suite(raw: dict[str, Any], source: str = "<suite>") -> Suite:
    """Validate a suite's TOML tables (see suites/cpu-demo.toml for the schema)."""

    def fail(msg: str) -> SuiteError:
        return SuiteError(f"{source}: {msg}")

    def table(d: dict, key: str, where: str) -> dict[str, Any]:
        v = d.get(key, {})
        if not isinstance(v, dict):
            raise fail(f"{where}{key} must be a table ({key} = {{ ... }} or [{key}]), got {v!r}")
        return dict(v)

    reject_unknown(raw, _TOP_KEYS, "", fail)
    head = table(raw, "suite", "")
    reject_unknown(head, _SUITE_KEYS, "suite.", fail)
    name = head.get("name", Path(source).stem)

    seeds = head.get("seeds", 1)
    first = head.get("seed", 0)
    if isinstance(seeds, list):
        if not seeds or not all(isinstance(s, int) for s in seeds):
            raise fail(f"suite.seeds={seeds!r} must be a count (seeds = 2) or a non-empty list of integers")
        seed_list = tuple(seeds)
    elif isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1 and isinstance(first, int):
        seed_list = tuple(first + i for i in range(seeds))
    else:
        raise fail(f"suite.seeds={seeds!r} must be a positive count (seeds = 2) or a list of integers")

    model = table(raw, "model", "")
    pretrained = parse_source(raw, table, fail) if "source" in raw else None
    known_model = {f.name for f in dataclasses.fields(ModelConfig)}
    if pretrained is not None:
        # the architecture is the source's; only the training context is chosen (RoPE families)
        known_model = {"block_size"}
        reject_unknown(model, known_model, "model.", fail)
        if not isinstance(model.get("block_size"), int) or model["block_size"] < 1:
            raise fail(
                "model.block_size must be set to the training context for a [source] suite "
                "(e.g. block_size = 128; a pretrained model's own window is usually far too long for a bench)"
            )
        preset = None
    else:
        preset = model.pop("preset", None)
        if preset not in MODEL_PRESETS:
            raise fail(f"model.preset={preset!r} must name a model preset: {', '.join(MODEL_PRESETS)}")
        if "attention" in model:
            raise fail("model.attention is set per method; list structures under [methods] instead")
        reject_unknown(model, known_model, "model.", fail)

    data = table(raw, "data", "")
    _check_data(data, fail)
    train = table(raw, "train", "")
    eval_opts = table(raw, "eval", "")
    reject_unknown(eval_opts, _EVAL_KEYS, "eval.", fail)
    for key, value in eval_opts.items():
        if key in ("speed", "nocache", "word_perplexity") and not isinstance(value, bool):
            raise fail(f"eval.{key}={value!r} must be true or false")
        if key in ("limit", "cloze_size", "batch_size", "eval_iters", "task_limit") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise fail(f"eval.{key}={value!r} must be a positive integer")
    if "tasks" in eval_opts:
        from kvlab.eval.tasks import TaskError, parse_tasks

        try:
            parse_tasks(eval_opts["tasks"])
        except (TaskError, AttributeError, TypeError) as e:
            raise fail(f"eval.tasks={eval_opts['tasks']!r}: {e}") from e

    methods_raw = table(raw, "methods", "")
    if not methods_raw:
        raise fail('no [methods]; add e.g. [methods] mha = "mha" and gqa = { kind = "gqa", n_kv_heads = 2 }')
    methods: dict[str, AttentionConfig | AttentionFile | Retrofit] = {}
    for mname, spec in methods_raw.items():
        if isinstance(spec, dict) and "attention_file" in spec:
            if pretrained is not None:
                raise fail(
                    f"methods.{mname}: an attention file trains seed 000's substrate from scratch; it cannot "
                    "be a method of a [source] suite (put it in a suite without [source])"
                )
            methods[mname] = parse_attention_file(mname, spec, source, fail)
            continue
        if pretrained is not None:
            methods[mname] = parse_retrofit(mname, spec, fail)
            continue
        try:
            if isinstance(spec, str):
                base = ModelConfig.preset(preset, **model)
                from kvlab.config import attention_preset

                methods[mname] = attention_preset(spec, base.n_layer, base.n_head, base.n_embd)
            elif isinstance(spec, dict):
                methods[mname] = AttentionConfig.from_dict(spec)
            else:
                raise fail(
                    f'methods.{mname}={spec!r} must be an attention preset name ("gqa") or a table of '
                    'AttentionConfig fields ({ kind = "gqa", n_kv_heads = 2 })'
                )
        except ConfigError as e:
            raise fail(f"methods.{mname}: {e}") from e

    regimes_raw = table(raw, "regimes", "")
    if not regimes_raw:
        raise fail('no [regimes]; add at least one, e.g. [regimes.train] heldout = "heldout"')
    regimes = []
    for rname, r in regimes_raw.items():
        if not isinstance(r, dict):
            raise fail(f"regimes.{rname} must be a table ([regimes.{rname}]), got {r!r}")
        reject_unknown(r, _REGIME_KEYS, f"regimes.{rname}.", fail)
        for sub in ("model", "train"):
            if not isinstance(r.get(sub, {}), dict):
                raise fail(f"regimes.{rname}.{sub} must be a table of overrides, got {r[sub]!r}")
        reject_unknown(r.get("model", {}), known_model - {"attention"}, f"regimes.{rname}.model.", fail)
        if pretrained is not None and "block_size" in r.get("model", {}):
            bs = r["model"]["block_size"]
            if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
                raise fail(f"regimes.{rname}.model.block_size={bs!r} must be a positive integer")
        heldout = r.get("heldout", "heldout")
        if isinstance(heldout, list) and heldout and all(isinstance(h, str) and h for h in heldout):
            heldout = tuple(heldout)
        elif not isinstance(heldout, str) or not heldout:
            raise fail(
                f"regimes.{rname}.heldout={heldout!r} must be a corpus name or a list of them "
                '(heldout = ["wikitext-2", "lambada"])'
            )
        for corpus in (heldout,) if isinstance(heldout, str) else heldout:
            _check_heldout(corpus, f"regimes.{rname}.heldout", fail)
        regimes.append(
            Regime(
                name=rname,
                model=dict(r.get("model", {})),
                train=dict(r.get("train", {})),
                heldout=heldout,
                description=str(r.get("description", "")),
            )
        )
    pareto = head.get("pareto_regime")
    if pareto is not None and pareto not in regimes_raw:
        raise fail(f"suite.pareto_regime={pareto!r} is not a regime; choose one of {', '.join(regimes_raw)}")

    suite = Suite(
        name=str(name),
        description=str(head.get("description", "")),
        model_preset=preset,
        model=model,
        data=data,
        train=train,
        eval=eval_opts,
        methods=methods,
        regimes=tuple(regimes),
        seeds=seed_list,
        pareto_regime=pareto,
        source=source,
        pretrained=pretrained,
    )
    if pretrained is None:  # every method must build in every regime (catches e.g. kv_rank too large)
        for mname in methods:
            for regime in suite.regimes:
                suite.model_config(mname, regime)
    return suite


def _check_data(data: dict[str, Any], fail) -> None:
    """[data] names a corpus and a tokenizer kvlab knows: caught by --dry-run, not when the bench starts."""
    from kvlab.data.corpora import CORPORA
    from kvlab.data.tokenizers import known_tokenizer_name
    from kvlab.models import MODELS

    reject_unknown(data, {"corpus", "tokenizer"}, "data.", fail)
    corpus = data.get("corpus", "shakespeare")
    if not isinstance(corpus, str) or not (corpus in CORPORA or Path(corpus).expanduser().exists()):
        raise fail(
            f"data.corpus={corpus!r} is not a corpus: use one of {', '.join(CORPORA)} or an existing path"
        )
    tok = data.get("tokenizer", "bpe-8k")
    if not known_tokenizer_name(tok):
        raise fail(
            f"data.tokenizer={tok!r} is not a tokenizer: use gpt2, bpe-N (bpe-8k, bpe-2048), a fetchable "
            f"model's name ({', '.join(sorted(MODELS))}) or hf:DIR with an existing directory"
        )


def _check_heldout(name: str, where: str, fail) -> None:
    """Caught here (and so by --dry-run), not hours later when the first evaluation loads it."""
    from kvlab.data.corpora import CORPORA

    if name == "heldout" or name in CORPORA or Path(name).expanduser().exists():
        return
    raise fail(
        f'{where}={name!r} is not a corpus: use "heldout" (the training corpus\'s held-out split), '
        f"one of {', '.join(CORPORA)}, or an existing path"
    )
