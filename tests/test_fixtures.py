"""The fixtures are what every other test trusts, so they are checked against independent references:
llama.cpp's tokenizer, transformers' own GGUF loader, and the real model answering a real question."""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.fixtures import (FIXTURE_NAMES, HF_FIXTURE_NAMES, LLAMA_CPP_PRE, WEIGHTS_FILES, build, fixture_path,
                           smollm2_original_gguf)
from kiln.fixtures.bpe import missing_bytes
from kiln.fixtures.smollm2 import GGUF_SHA256
from kiln.fixtures.strings import tokenizer_strings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

TINY = ("tiny-qwen2", "tiny-qwen3", "tiny-llama")
PROMPTS = (
    "The bakery on Orchard Lane opens at six in the morning, but the work starts long before that.",
    "What is the capital of France?",
    "def mean(values):\n    return sum(values) / len(values)\n",
)
N_PARITY = 5000


def _chat_ids(tok, text: str):
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )


def _load(path: Path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return _load(smollm2_dir)


# ---------------------------------------------------------------- API


def test_unknown_fixture_is_a_user_error():
    with pytest.raises(KilnError, match="unknown fixture"):
        build("gpt-5")


def test_fixture_path_before_build_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    with pytest.raises(KilnError, match=r"fixture tiny-llama is not built: run `kiln fixtures`"):
        fixture_path("tiny-llama")
    with pytest.raises(KilnError, match="not built"):
        smollm2_original_gguf()


def test_build_twice_is_a_noop(fixture_dirs):
    before = {n: (d / WEIGHTS_FILES.get(n, "model.safetensors")).stat().st_mtime_ns for n, d in fixture_dirs.items()}
    start = time.perf_counter()
    again = {n: build(n, progress=False) for n in FIXTURE_NAMES}
    assert time.perf_counter() - start < 1.0
    assert again == fixture_dirs
    assert {n: fixture_path(n) for n in FIXTURE_NAMES} == fixture_dirs
    assert {n: (d / WEIGHTS_FILES.get(n, "model.safetensors")).stat().st_mtime_ns for n, d in again.items()} == before


def test_every_fixture_is_a_complete_hf_checkpoint(fixture_dirs):
    for name in HF_FIXTURE_NAMES:
        d = fixture_dirs[name]
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (d / f).is_file(), f"{name} lacks {f}"
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["chat_template"] and cfg["eos_token"], name
        assert not list(d.parent.glob(f".{name}.*.part")), "a temporary build dir was left behind"


def test_tiny_build_is_deterministic(tmp_path, monkeypatch):
    digests = []
    for root in ("a", "b"):
        monkeypatch.setenv("KILN_CACHE", str(tmp_path / root))
        d = build("tiny-qwen2", progress=False)
        assert d == tmp_path / root / "fixtures" / "tiny-qwen2"
        digests.append({f: (d / f).read_bytes() for f in ("model.safetensors", "tokenizer.json", "config.json")})
    assert digests[0] == digests[1]


# ---------------------------------------------------------------- smollm2-135m: the real model


def test_smollm2_config_matches_the_release(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok_cfg["add_bos_token"] is False
    assert "Apache" in (smollm2_dir / "LICENSE").read_text()


def test_smollm2_original_gguf_is_kept(smollm2_dir):
    from kiln.atomic import sha256_file

    gguf = smollm2_original_gguf()
    assert gguf.parent == smollm2_dir.parent and gguf.name == "smollm2-135m.Q4_1.gguf"
    assert sha256_file(gguf) == GGUF_SHA256


def test_smollm2_answers_paris(smollm2):
    tok, model = smollm2
    inputs = _chat_ids(tok, "What is the capital of France?")
    text = tok.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _transformers_gguf_model(gguf: Path):
    """The GGUF as transformers loads it (its own dequantization and q/k un-permutation).

    ``from_pretrained(gguf_file=...)`` insists on `accelerate`, which kiln does not depend on; without it
    we call the function it uses, ``load_gguf_checkpoint``, and load the tensors ourselves.
    """
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        ).eval()
    except ValueError as exc:
        if "accelerate" not in str(exc):
            raise
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"this transformers cannot load GGUF without accelerate: {exc}")
    meta = load_gguf_checkpoint(str(gguf))["config"]
    config = transformers.LlamaConfig(**{k: v for k, v in meta.items() if k not in ("model_type", "architectures")})
    model = transformers.LlamaForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    model.tie_weights()
    return model


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf_loader(smollm2, smollm2_dir):
    tok, ours = smollm2
    theirs = _transformers_gguf_model(smollm2_original_gguf())
    inputs = _chat_ids(tok, "What is the capital of France?")
    with torch.no_grad():
        a = ours(**inputs).logits[0]
        b = theirs(**inputs).logits[0]
    assert a.std() > 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- tokenizers


def test_smollm2_tokenizer_matches_llama_cpp(smollm2_dir):
    """Our tokenizer.json tokenizes exactly like llama.cpp ("smollm" pre-type) on the original GGUF.

    No exclusions: the 21 bytes SmolLM2's vocabulary cannot encode (see smollm2.py) are dropped by both.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    theirs = llama_cpp.Llama(model_path=str(smollm2_original_gguf()), vocab_only=True, verbose=False)
    texts = tokenizer_strings(N_PARITY)
    diffs = []
    for s in texts:
        a = ours.encode(s, add_special_tokens=False).ids
        b = theirs.tokenize(s.encode("utf-8"), add_bos=False, special=True)
        if a != b:
            diffs.append((s, a, b))
    assert not diffs, f"{len(diffs)}/{len(texts)} differ, first: {diffs[0]!r}"


def _vocab_only_gguf(d: Path, pre: str, out: Path) -> Path:
    """A GGUF holding only the tokenizer of checkpoint ``d``, declared with llama.cpp pre-type ``pre``."""
    import gguf

    data = json.loads((d / "tokenizer.json").read_text())
    vocab = {**data["model"]["vocab"], **{a["content"]: a["id"] for a in data["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("name", TINY)
def test_tiny_tokenizers_match_llama_cpp_pre_types(name, fixture_dirs, tmp_path):
    """The tiny tokenizers pre-tokenize exactly like llama.cpp's "qwen2" / "llama-bpe", so GGUF exports agree.

    Inputs are NFC-normalized first: the HF tokenizers normalize to NFC (as Qwen's do), llama.cpp does
    not normalize at all, so non-NFC text (e.g. "e" + U+0301) tokenizes differently there, by design.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    d = fixture_dirs[name]
    ours = Tokenizer.from_file(str(d / "tokenizer.json"))
    theirs = llama_cpp.Llama(
        model_path=str(_vocab_only_gguf(d, LLAMA_CPP_PRE[name], tmp_path / "vocab.gguf")), vocab_only=True, verbose=False
    )
    texts = tokenizer_strings(N_PARITY)
    if name == "tiny-llama":  # use its own special tokens in the chat markup
        swap = {"<|im_start|>": "<|start_header_id|>", "<|im_end|>": "<|eot_id|>", "<|endoftext|>": "<|end_of_text|>"}
        for old, new in swap.items():
            texts = [s.replace(old, new) for s in texts]
    diffs = []
    for s in map(lambda s: unicodedata.normalize("NFC", s), texts):
        a = ours.encode(s, add_special_tokens=False).ids
        if a != theirs.tokenize(s.encode("utf-8"), add_bos=False, special=True):
            diffs.append(s)
    assert not diffs, f"{len(diffs)}/{len(texts)} differ, first: {diffs[0]!r}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tokenizer_round_trip(name, fixture_dirs):
    tok = Tokenizer.from_file(str(fixture_dirs[name] / "tokenizer.json"))
    unencodable = set(missing_bytes(tok))
    if name != "smollm2-135m":
        assert not unencodable, "a trained tokenizer must cover all 256 bytes"
    nfc = tok.normalizer is not None  # the tiny Qwen/Llama tokenizers normalize to NFC, like Qwen's
    checked = 0
    for s in tokenizer_strings(2000, seed=99, specials=False):
        if unencodable & set(s.encode("utf-8")):
            continue  # SmolLM2 has no token for these bytes; both HF and llama.cpp drop them
        ids = tok.encode(s, add_special_tokens=False).ids
        expected = unicodedata.normalize("NFC", s) if nfc else s
        assert tok.decode(ids, skip_special_tokens=False) == expected
        checked += 1
    assert checked > 1900


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_transformers_tokenizer_uses_our_tokenizer_json(name, fixture_dirs):
    """AutoTokenizer must not rebuild the pipeline (transformers 5 picks classes by model type)."""
    d = fixture_dirs[name]
    auto = transformers.AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert len(auto) == raw.get_vocab_size(with_added_tokens=True)
    for s in tokenizer_strings(500, seed=7):
        ids = auto(s)["input_ids"]
        assert ids == raw.encode(s).ids, s
        assert auto.decode(ids) == raw.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- tiny random checkpoints


@pytest.fixture(scope="module", params=TINY)
def tiny(request, fixture_dirs):
    d = fixture_dirs[request.param]
    tok, model = _load(d)
    return request.param, d, tok, model


def test_tiny_vocab_and_logits(tiny):
    name, d, tok, model = tiny
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert model.config.max_position_embeddings == 512
    assert next(model.parameters()).dtype == torch.float32
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt")).logits[0]
        # Parity tests on near-uniform logits prove nothing; see initializer_range in tiny.py.
        assert logits.std(-1).mean() > 1.5, name
    with torch.no_grad():
        out = model.generate(**_chat_ids(tok, "Hello there"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4


def test_tiny_chat_templates(tiny_qwen2_dir, tiny_qwen3_dir, tiny_llama_dir):
    msgs = [{"role": "user", "content": "Hi"}]
    render = lambda d, m=msgs: transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(  # noqa: E731
        m, add_generation_prompt=True, tokenize=False
    )
    assert render(tiny_qwen2_dir) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert render(tiny_qwen2_dir, with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert render(tiny_qwen3_dir) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(tiny_llama_dir) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(d / "model.safetensors")


def test_tiny_qwen2_properties(tiny_qwen2_dir):
    cfg = transformers.AutoConfig.from_pretrained(tiny_qwen2_dir)
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.intermediate_size) == (256, 512)  # multiples of 256: k-quants apply
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # GQA
    assert cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == 1e-6
    t = _tensors(tiny_qwen2_dir)
    assert "lm_head.weight" not in t
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = t[f"model.layers.0.self_attn.{proj}.bias"]
        assert bias.abs().mean() > 0.01, "biases must be non-zero or bias handling is untested"
    assert (t["model.norm.weight"] - 1).abs().mean() > 0.01, "norm weights must not all be 1"
    tok = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    assert tok("Hi")["input_ids"][0] != tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added


def test_tiny_qwen3_properties(tiny_qwen3_dir):
    cfg = transformers.AutoConfig.from_pretrained(tiny_qwen3_dir)
    assert cfg.model_type == "qwen3"
    assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    assert not cfg.tie_word_embeddings
    t = _tensors(tiny_qwen3_dir)
    assert "lm_head.weight" in t and "model.layers.0.self_attn.q_norm.weight" in t
    assert t["model.layers.0.self_attn.q_norm.weight"].shape == (cfg.head_dim,)
    assert (t["model.layers.0.self_attn.k_norm.weight"] - 1).abs().mean() > 0.01


def test_tiny_llama_properties(tiny_llama_dir):
    cfg = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    assert cfg.model_type == "llama" and not cfg.tie_word_embeddings
    assert "lm_head.weight" in _tensors(tiny_llama_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok("Hi")["input_ids"][0] == bos
    chat = _chat_ids(tok, "Hi")["input_ids"][0].tolist()
    assert chat[0] == bos and chat.count(bos) == 1
    gen = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
