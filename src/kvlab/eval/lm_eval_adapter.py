"""An lm-evaluation-harness model backed by a kvlab run: `--model kvlab --model_args run=RUN`.

Importing this module registers the model under the name "kvlab" in lm_eval's registry (lm_eval has
no plugin entry points, so the import is what makes the name known; a bare `lm_eval --model kvlab`
fails). From a shell, `kvlab lm-eval` or `kvlab-lm-eval` (kvlab.eval.lm_eval_cli) registers it and runs
lm_eval's own command line:

    kvlab-lm-eval --model kvlab --model_args run=runs/gqa --tasks piqa --limit 50

takes exactly lm_eval's command-line arguments; from Python, `import kvlab.eval.lm_eval_adapter` and
then `lm_eval.simple_evaluate(model="kvlab", model_args="run=runs/gqa", tasks=[...])`.

The scoring is kvlab's (kvlab.eval.lm.loglikelihood_tokens, which follows lm-eval's HF backend:
context/continuation split with trailing spaces moved to the continuation, left truncation to the
model's context, an empty context replaced by the end-of-text token); generation is kvlab's cached
decoding. model_args: run (required), device, max_length (default: the model's block_size); the batch
size is lm_eval's own --batch_size. A device or batch_size in model_args wins over lm_eval's --device and
--batch_size (its CLI always passes both, --device defaulting to cuda:0).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from kvlab.errors import KvlabError
from kvlab.eval.lm import loglikelihood_tokens, rolling_loglikelihood
from kvlab.eval.tasks import encode_request

DEFAULT_BATCH = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF default for generate_until


def _batch(batch_size) -> int:
    """lm_eval passes batch_size as an int, a digit string or "auto" (kvlab then uses its default)."""
    try:
        return max(1, int(batch_size))
    except (TypeError, ValueError):
        return DEFAULT_BATCH


class KvlabLM(LM):
    """lm_eval's LM interface over a kvlab GPT and its tokenizer (single process)."""

    def __init__(
        self,
        run: str | None = None,
        device: str | None = None,
        batch_size=DEFAULT_BATCH,
        max_length: int | None = None,
        model=None,
        tokenizer=None,
        **_ignored,  # lm_eval's generic options (max_batch_size, ...) that do not apply here
    ) -> None:
        super().__init__()
        # lm_eval's CLI asks for "cuda" by default; like its HF backend, fall back to the CPU without one
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            if run is None:
                raise KvlabError("the kvlab lm_eval model needs --model_args run=RUN_DIR (a kvlab run)")
            from kvlab.checkpoint import load_model, load_model_tokenizer

            model = load_model(run, device=device)
            tokenizer = load_model_tokenizer(run, model)  # one line when it does not fit the model
        elif tokenizer is None:
            raise KvlabError("KvlabLM(model=...) also needs tokenizer=...")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = _batch(batch_size)
        self.max_length = int(max_length or model.config.block_size)
        self._device = next(model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> KvlabLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> KvlabLM:
        """model_args first; lm_eval's own options (device, batch_size, ...) fill only what they leave
        unset. lm_eval's base class passes both, so `device=cpu` in model_args raised a TypeError."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_request(self.tokenizer, *req.args) for req in requests]
        return loglikelihood_tokens(self.model, pairs, self.max_length, self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        token_lists = [list(self.tokenizer.encode(req.args[0])) for req in requests]
        return rolling_loglikelihood(
            self.model, token_lists, self.max_length, self.eot_token_id, self.batch_size
        )

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations cut at the first stop string. Requests with the same
        generation options run batch_size at a time as one ragged batch (kvlab.generate: contexts of
        different lengths without padding), longest contexts first; results come back in request order."""
        from kvlab.generate import generate

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_gen = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ctx = list(self.tokenizer.encode(context)) or [self.eot_token_id]
            # as lm-eval's HF backend: keep the last (max_length - max_gen_toks) context tokens
            ctx = ctx[-max(1, self.max_length - max_gen) :]
            new = min(max_gen, self.max_length - len(ctx))
            if new < 1:
                outputs[i] = ""
                continue
            groups.setdefault((until, new, temperature), []).append((i, ctx))
        for (until, new, temperature), items in groups.items():
            items.sort(key=lambda item: -len(item[1]))
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                prompts = [torch.tensor(ctx, dtype=torch.long, device=self._device) for _, ctx in chunk]
                eos = self.eot_token_id
                result = generate(self.model, prompts, new, temperature=temperature, eos_token=eos)
                for (i, ctx), row in zip(chunk, result.sequences()):
                    outputs[i] = self._until(row[len(ctx) :], until)
        return outputs

    def _until(self, new_tokens: list[int], until: tuple) -> str:
        if self.eot_token_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(self.eot_token_id)]
        text = self.tokenizer.decode(new_tokens)
        for stop in until:  # lm-eval cuts the generation at the first stop sequence
            if stop:
                text = text.split(stop)[0]
        return text


if __name__ != "__main__":  # registered once, under this module's import name (not as __main__.KvlabLM)
    KvlabLM = register_model("kvlab")(KvlabLM)


if __name__ == "__main__":  # `python -m kvlab.eval.lm_eval_adapter ...` is `kvlab-lm-eval ...`
    import sys

    from kvlab.eval.lm_eval_cli import main

    sys.exit(main())
