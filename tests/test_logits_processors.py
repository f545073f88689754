"""kiln potentials as logits processors in llama-cpp-python's and transformers' own generate loops:
constrained output matches the constraint, the prompt is handled, and EOS goes through every EOG id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance")

from kiln.errors import KilnError  # noqa: E402
from kiln.fixtures import smollm2_original_gguf  # noqa: E402
from kiln.runtime.logits_processors import llama_cpp_logits_processor, transformers_logits_processor  # noqa: E402
from kiln.runtime.potentials import FromCallable, JsonSchema, Length, Regex, Vocab  # noqa: E402

PHONE = r"[0-9]{3}-[0-9]{4}"


@pytest.fixture(scope="module")
def gguf(smollm2_dir: Path) -> Path:
    return smollm2_original_gguf()


@pytest.fixture(scope="module")
def vocab(gguf: Path) -> Vocab:
    pytest.importorskip("llama_cpp")
    from kiln.runtime.llamacpp import LlamaCppEngine

    with LlamaCppEngine(gguf, n_ctx=64, n_seq_max=1, threads=1) as engine:
        yield Vocab.from_engine(engine)  # its tokenize needs the engine open


@pytest.fixture(scope="module")
def llama(gguf: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from kiln import llamacpp_log

    llamacpp_log.install()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False, seed=0)
    yield llm
    llm.close()


def test_llama_cpp_regex(llama, vocab):
    from llama_cpp import LogitsProcessorList

    for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2)):
        proc = llama_cpp_logits_processor(Regex(vocab, PHONE))
        out = llama.create_completion("My phone number is ", max_tokens=24, temperature=temperature, seed=seed,
                                      logits_processor=LogitsProcessorList([proc]))
        text = out["choices"][0]["text"]
        assert re.fullmatch(PHONE, text), text
        assert out["choices"][0]["finish_reason"] == "stop"  # EOS came through an EOG id
        assert proc.prompt_len == len(llama.tokenize(b"My phone number is "))


def test_llama_cpp_json_and_reset(llama, vocab):
    from llama_cpp import LogitsProcessorList

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
              "required": ["name"], "additionalProperties": False}
    proc = llama_cpp_logits_processor(JsonSchema(vocab, schema, options={"whitespace_flexible": False}))
    for prompt in ("A JSON object with a name: ", "Give the name as JSON: "):  # one processor, two generations
        out = llama.create_completion(prompt, max_tokens=40, temperature=0.0,
                                      logits_processor=LogitsProcessorList([proc]))
        value = json.loads(out["choices"][0]["text"])
        assert set(value) == {"name"} and len(value["name"]) <= 12


def test_processor_tracks_suffix_incrementally(vocab):
    proc = llama_cpp_logits_processor(Length(vocab, max=2), prompt_len=3)
    scores = np.zeros(vocab.size, dtype=np.float32)
    prompt = [1, 2, 3]
    out0 = proc(np.array(prompt), scores)
    assert np.all(out0 == 0)
    out2 = proc(np.array(prompt + [100, 101]), scores)  # two generated tokens: only EOS allowed now
    eog = sorted(vocab.eog_ids)
    assert np.all(out2[eog] == 0) and np.isneginf(np.delete(out2, eog)).all()
    out1 = proc(np.array(prompt + [100]), scores)  # a different branch is rebuilt from the prompt
    assert np.all(out1 == 0)
    auto = llama_cpp_logits_processor(Length(vocab, max=1))
    assert np.all(auto(np.array([5, 6, 7, 8]), scores) == 0) and auto.prompt_len == 4
    assert np.isneginf(auto(np.array([5, 6, 7, 8, 100]), scores)[100])
    assert np.all(auto(np.array([9, 9]), scores) == 0) and auto.prompt_len == 2  # a new generation
    with pytest.raises(KilnError, match="no logw_next"):
        llama_cpp_logits_processor(FromCallable(vocab, complete=lambda s: True))


def test_transformers_regex(smollm2_dir, vocab):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine are much slower than 1
    try:
        _generate_checks(torch, tok, model, vocab)
    finally:
        torch.set_num_threads(threads)


def _generate_checks(torch, tok, model, vocab):
    eos = sorted(vocab.eog_ids)
    prompt = tok("My phone number is ", return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    proc = transformers_logits_processor(Regex(vocab, PHONE), prompt_len=n)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False, logits_processor=[proc],
                             eos_token_id=eos, pad_token_id=eos[0])
    text = tok.decode([t for t in out[0, n:].tolist() if t not in eos])
    assert re.fullmatch(PHONE, text), text
    # a sampled batch of rows, prompt length taken from the first call
    proc = transformers_logits_processor(Regex(vocab, PHONE))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=True, num_return_sequences=3,
                             logits_processor=[proc], eos_token_id=eos, pad_token_id=eos[0])
    for row in out[:, n:].tolist():
        text = tok.decode([t for t in row if t not in eos])
        assert re.fullmatch(PHONE, text), text
