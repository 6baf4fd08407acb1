"""`kvlab-lm-eval` and `kvlab lm-eval`: lm-evaluation-harness's own command line, kvlab's model registered.

lm_eval 0.4 finds models only through its registry and has no plugin entry points, so a bare
`lm_eval --model kvlab` cannot know kvlab. These commands import kvlab's adapter (which registers "kvlab")
and then run lm_eval's console entry (`lm_eval.__main__.cli_evaluate`) on the same arguments; `--model`
defaults to kvlab.
"""

from __future__ import annotations

import argparse
import sys

from kvlab.errors import KvlabError

PROG = "kvlab-lm-eval"
EXAMPLES = """lm-evaluation-harness's command line with the kvlab model registered; every argument goes to
lm_eval (`lm_eval run --help` lists them). --model defaults to kvlab; --model_args run=RUN_DIR names the
run, optionally device=cpu|cuda:N and max_length=N. Errors are one line; `kvlab --debug lm-eval ...`
shows the traceback.

examples:
  kvlab lm-eval --model_args run=runs/gqa --tasks piqa --batch_size 16 --limit 50
  kvlab lm-eval --model kvlab --model_args run=runs/gqa,device=cpu --tasks my_task --include_path tasks/
  kvlab-lm-eval --model kvlab --model_args run=runs/gqa --tasks arc_easy    # the same, as its own command"""


def with_default_model(argv: list[str]) -> list[str]:
    """argv with `--model kvlab` added to an evaluation (lm_eval's `run`, explicit or implied) naming none."""
    if not argv or argv in (["-h"], ["--help"]) or not (argv[0] == "run" or argv[0].startswith("-")):
        return list(argv)  # help, `ls`, `validate`: lm_eval's as they are
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        return list(argv)
    return ["run", "--model", "kvlab", *argv[1:]] if argv[0] == "run" else ["--model", "kvlab", *argv]


def run_lm_eval(argv: list[str], prog: str = PROG) -> int:
    """Register kvlab's model, then run lm_eval's CLI on argv (its SystemExit, e.g. from --help, passes)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise KvlabError(f"lm_eval is not installed ({e}); pip install 'kvlab[lm-eval]'") from e
    import kvlab.eval.lm_eval_adapter  # noqa: F401  (registers the model "kvlab")

    saved = sys.argv
    sys.argv = [prog, *with_default_model(argv)]  # lm_eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except KvlabError:
        raise
    except ValueError as e:  # lm_eval's own user errors ("Tasks not found: ...", bad model_args)
        raise KvlabError("lm_eval: " + " ".join(str(e).split())) from e
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `kvlab-lm-eval` console script: lm_eval's arguments; a kvlab mistake is one line, exit 2."""
    try:
        return run_lm_eval(sys.argv[1:] if argv is None else list(argv))
    except KvlabError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.lm_eval_args in (["-h"], ["--help"]):
        print(f"usage: kvlab lm-eval [LM_EVAL ARGUMENTS ...]\n\n{EXAMPLES}\n\nlm_eval's own help follows.\n")
    return run_lm_eval(args.lm_eval_args, prog="kvlab lm-eval")


def register(sub) -> None:
    # prefix_chars="+": this parser claims no "-" options, so every argument (--model ..., --help) reaches
    # lm_eval untouched (an argparse.REMAINDER after a subcommand cannot start with an option otherwise)
    p = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness on a kvlab run (lm_eval's arguments, --model kvlab)",
        add_help=False,
        prefix_chars="+",
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run)
