"""kiln's GGUF metadata equals what llama.cpp's own convert_hf_to_gguf.py writes for the same checkpoint.

Why: tools that ask a GGUF for its BOS, head size or template (llama.cpp, Ollama, anything using
gguf-py) must get the same answer from kiln's file as from the converter's. A key kiln leaves out makes
llama.cpp fall back to its own default (for BOS that is token 11 in a BPE vocabulary: the wrong token),
and a key present with another value is as bad. So this compares key sets and the values of every
shared key (scalars and the tokens / merges / token_type arrays alike), plus the tensors, on every
fixture (the mixture-of-experts ones included: expert keys, stacked expert tensors) and on copies that
state what real checkpoints state: Qwen's `"bos_token": null` with a `bos_token_id` in config.json, Llama
with and without `head_dim`, Mistral, yarn and linear rope.
The keys kiln deliberately adds, leaves out or writes differently are listed below with the reason.

The converter is llama-cpp-python 0.3.36's (kiln.fixtures.llama_converter), run unmodified except
that it is told the pre-tokenizer name of the tiny fixtures, whose freshly trained vocabularies its
hash table cannot know (the real SmolLM2 vocabulary it recognises by itself). All conversions run in
one child process; this module takes about half a minute.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports it: pip install -e '.[dev]'")

import gguf  # noqa: E402

from kiln.fixtures import LLAMA_CPP_PRE, build  # noqa: E402
from kiln.fixtures.llama_converter import convert_many  # noqa: E402
from kiln.pipeline import export_gguf_artifact  # noqa: E402

pytestmark = pytest.mark.slow

# --- what kiln deliberately does differently, and why ---------------------------------------------------

EOT_WHY = ("llama.cpp finds the end-of-turn token by its text when it loads a file (same token); kiln writes "
           "the id so its Modelfile writer (export/modelfile.py) takes the stop token from the file")
LICENSE_WHY = ("kiln reads the checkpoint's LICENSE file; the converter looks for a license only in a "
               "README.md model card")
QWEN_DIMS_WHY = ("the converter writes vocab_size and rope.dimension_count for llama only; kiln writes them "
                 "for every family (equal to what llama.cpp derives: the token count and the head size) so "
                 "readers such as kiln inspect need no per-family rule")
LINEAR_ORIG_WHY = ("kiln raises context_length to factor x trained context (DESIGN.md §5), so it keeps the "
                   "trained one here (llama.cpp's n_ctx_orig); the converter leaves context_length as is")
YARN_ATTN_WHY = ("the attention factor in the key llama.cpp reads for llama/qwen2/qwen3, relative to its own "
                 "0.1 ln s + 1; the converter's yarn_attn_factor (also written by kiln) is read only by other "
                 "architectures")

# general.* keys the converter derives from the directory name and a README model card with heuristics
# (gguf-py's Metadata: "smollm2-135m" -> basename "smollm2"). Cosmetic: nothing in llama.cpp reads them.
CONVERTER_ONLY_COSMETIC = ("general.basename", "general.finetune", "general.version", "general.organization",
                           "general.description", "general.tags", "general.languages", "general.datasets",
                           "general.base_model.", "general.license.", "general.url", "general.repo_url",
                           "general.quantized_by", "general.source.")

NAME_WHY = ("kiln names the model as the checkpoint does (config.json _name_or_path, else the directory "
            "name verbatim); the converter title-cases the directory name ('Tiny Qwen2')")
CONTEXT_WHY = "with rope scaling kiln raises context_length to factor x trained context (DESIGN.md §5)"


@dataclass(frozen=True)
class Case:
    name: str
    fixture: str
    config: dict[str, Any] | None = None  # keys set in a copy's config.json (None value: removed)
    rope: str = "none"
    tokenizer_config: dict[str, Any] | None = None  # keys set in a copy's tokenizer_config.json
    converter_args: tuple[str, ...] = ()  # extra arguments to convert_hf_to_gguf.py
    mtp: int = 0  # multi-token prediction layers added to a copy (kiln.fixtures.tiny.add_mtp_head), as published


CASES = (
    Case("tiny-qwen2", "tiny-qwen2"),
    Case("tiny-qwen3", "tiny-qwen3"),
    Case("tiny-llama", "tiny-llama"),
    Case("smollm2-135m", "smollm2-135m"),
    # Mixtures of experts: the expert keys, the experts stacked into one tensor per kind, routers in F32.
    Case("tiny-qwen2-moe", "tiny-qwen2-moe"),
    Case("tiny-qwen3-moe", "tiny-qwen3-moe"),
    # Qwen3.5's Gated DeltaNet hybrid: ssm_* keys, recurrent layer flags, partial rotary with MRoPE sections,
    # the converter's row transforms (-exp(A_log), 1 + w norms, squeezed conv, value heads tiled). kiln writes
    # no multi-token prediction head; transformers saves none, and the converter then needs --no-mtp.
    Case("tiny-qwen3_5", "tiny-qwen3_5", converter_args=("--no-mtp",)),
    # With the multi-token prediction head published checkpoints carry (mtp.*), which the converter writes by
    # default: one more block (blk.4: a full-attention layer plus nextn.eh_proj / enorm / hnorm /
    # shared_head_norm, norms 1 + w), block_count 5, nextn_predict_layers 1, the block flagged not recurrent.
    Case("tiny-qwen3_5-mtp", "tiny-qwen3_5-mtp"),
    # Qwen3.5-MoE (qwen35moe): the hybrid's keys and transforms with Qwen3-MoE-like stacked experts, routers and
    # the shared expert's gate F32, no feed_forward_length (its config has no dense width); and with an MTP head
    # whose layer holds one tensor per expert, as Qwen3.5-35B-A3B's does.
    Case("tiny-qwen3_5-moe", "tiny-qwen3_5-moe", converter_args=("--no-mtp",)),
    Case("qwen3_5-moe-mtp", "tiny-qwen3_5-moe", {"mtp_num_hidden_layers": 1}, mtp=1),
    # Real Qwen2/2.5/3 checkpoints: "bos_token": null in tokenizer_config.json, bos_token_id (<|endoftext|>)
    # in config.json. The converter falls back to config.json; so must kiln.
    Case("qwen2-bos-from-config", "tiny-qwen2", {"bos_token_id": "<|endoftext|>"}),
    # head_dim stated (transformers 5 writes it for Llama) and absent (older checkpoints): both converted
    # through transformers' LlamaConfig, which defines it either way.
    Case("llama-head-dim", "tiny-llama", {"head_dim": "hidden/heads"}),
    Case("llama-no-head-dim", "tiny-llama", {"head_dim": None}),
    # MistralForCausalLM is read as the llama family by both.
    Case("mistral", "tiny-llama", {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                   "sliding_window": None}),
    Case("qwen2-yarn", "tiny-qwen2", {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 1000000.0,
        "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.2}}, rope="yarn"),
    Case("llama-linear", "tiny-llama", {"rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, rope="linear"),
    # Named chat templates (a list in tokenizer_config.json): tokenizer.chat_template + .tool_use + the name list.
    Case("named-chat-templates", "tiny-qwen2", tokenizer_config={"chat_template": [
        {"name": "default", "template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
        {"name": "tool_use", "template": "{{ tools | tojson }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}]}),
)


def _make_source(case: Case, root: Path) -> Path:
    """The fixture itself, or a copy whose config.json says what `case.config` says."""
    src = build(case.fixture, progress=False)
    if case.config is None and case.tokenizer_config is None and not case.mtp:
        return src
    dest = root / case.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".kiln-*"))
    config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    vocab = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    if case.tokenizer_config:
        tok_config = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok_config.update(case.tokenizer_config)
        (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    for key, value in (case.config or {}).items():
        if value is None:
            config.pop(key, None)
        elif value == "hidden/heads":
            config[key] = config["hidden_size"] // config["num_attention_heads"]
        elif isinstance(value, str) and value in added:
            config[key] = added[value]
        else:
            config[key] = value
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if case.mtp:
        from kiln.fixtures.tiny import add_mtp_head

        add_mtp_head(dest, case.mtp, config["initializer_range"], seed=0)
    return dest


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """case name -> (source dir, kiln's f32 GGUF, the converter's f32 GGUF)."""
    root = tmp_path_factory.mktemp("gguf-keys")
    jobs, out = [], {}
    for case in CASES:
        src = _make_source(case, root / "src")
        kiln_out, conv_out = root / f"{case.name}.kiln.gguf", root / f"{case.name}.llama.gguf"
        export_gguf_artifact(src, kiln_out, "f32", verify=False)
        # The real SmolLM2 vocabulary is in the converter's table: let it find the name itself.
        pre = None if case.fixture == "smollm2-135m" else LLAMA_CPP_PRE[case.fixture]
        jobs.append((src, conv_out, pre, case.converter_args))
        out[case.name] = (src, kiln_out, conv_out)
    convert_many(jobs, "f32")
    return out


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _deliberate(case: Case, arch: str, src: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(keys only kiln writes, shared keys whose values differ): key -> why, for this case."""
    adds = {"tokenizer.ggml.eot_token_id": EOT_WHY}
    if arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
        adds[f"{arch}.vocab_size"] = adds[f"{arch}.rope.dimension_count"] = QWEN_DIMS_WHY
    if arch in ("qwen35", "qwen35moe"):  # the converter writes its (partial) rope.dimension_count itself
        adds[f"{arch}.vocab_size"] = QWEN_DIMS_WHY
    if (src / "LICENSE").is_file():
        adds["general.license"] = LICENSE_WHY
    if case.rope == "linear":
        adds[f"{arch}.rope.scaling.original_context_length"] = LINEAR_ORIG_WHY
    if case.rope == "yarn":
        adds[f"{arch}.rope.scaling.attn_factor"] = YARN_ATTN_WHY
    values = {"general.name": NAME_WHY}
    if case.rope != "none":
        values[f"{arch}.context_length"] = CONTEXT_WHY
    return adds, values


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.float32(a) == np.float32(b))
    return a == b


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_keys_and_values_equal_llama_cpp_converter(pairs, case: Case) -> None:
    src, kiln_path, conv_path = pairs[case.name]
    kiln, conv = _fields(kiln_path), _fields(conv_path)
    arch = conv["general.architecture"]
    assert kiln["general.architecture"] == arch
    adds, values = _deliberate(case, arch, src)

    only_kiln = set(kiln) - set(conv)
    only_conv = {k for k in set(conv) - set(kiln) if not k.startswith(CONVERTER_ONLY_COSMETIC)}
    assert only_conv == set(), f"keys the converter writes and kiln does not: {sorted(only_conv)}"
    assert only_kiln == set(adds), (f"keys only kiln writes: {sorted(only_kiln)}, "
                                    f"deliberate: {sorted(adds)}")

    differ = {k for k in set(kiln) & set(conv) if not _same(kiln[k], conv[k])}
    shown = {k: (str(kiln[k])[:80], str(conv[k])[:80]) for k in differ - set(values)}
    assert differ - set(values) == set(), f"values differ (kiln, converter): {shown}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tensors_equal_llama_cpp_converter(pairs, case: Case) -> None:
    _, kiln_path, conv_path = pairs[case.name]
    kiln = {t.name: t for t in gguf.GGUFReader(kiln_path).tensors}
    conv = {t.name: t for t in gguf.GGUFReader(conv_path).tensors}
    assert sorted(kiln) == sorted(conv)
    for name, t in kiln.items():
        c = conv[name]
        assert (t.tensor_type, list(t.shape)) == (c.tensor_type, list(c.shape)), name
        assert np.array_equal(t.data, c.data), name


@pytest.mark.parametrize("name", ["tiny-qwen3_5-mtp", "qwen3_5-moe-mtp"])
def test_mtp_head_is_written_after_the_last_layer(pairs, name: str) -> None:
    """The MTP head as one more block (what the equality above compares, spelled out): block_count and the
    recurrent-layer flags one longer, nextn_predict_layers 1, the head's own tensors in the new block."""
    src, kiln_path, _ = pairs[name]
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    fields = _fields(kiln_path)
    arch = fields["general.architecture"]
    assert (fields[f"{arch}.block_count"], fields[f"{arch}.nextn_predict_layers"]) == (n + 1, 1)
    assert fields[f"{arch}.attention.recurrent_layers"] == [t == "linear_attention" for t in config["layer_types"]] + [
        False]
    names = {t.name for t in gguf.GGUFReader(kiln_path).tensors}
    for suffix in ("nextn.eh_proj", "nextn.enorm", "nextn.hnorm", "nextn.shared_head_norm", "attn_q", "attn_q_norm"):
        assert f"blk.{n}.{suffix}.weight" in names, suffix
    assert not any(t.startswith(f"blk.{n + 1}.") for t in names)


def test_bos_falls_back_to_config_json(pairs) -> None:
    """The issue's case: `"bos_token": null` but config.json's bos_token_id, and no BOS added."""
    src, kiln_path, _ = pairs["qwen2-bos-from-config"]
    assert json.loads((src / "tokenizer_config.json").read_text())["bos_token"] is None
    fields = _fields(kiln_path)
    assert fields["tokenizer.ggml.bos_token_id"] == json.loads((src / "config.json").read_text())["bos_token_id"]
    assert fields["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("name", ["llama-head-dim", "llama-no-head-dim", "tiny-qwen3"])
def test_head_dim_keys(pairs, name: str) -> None:
    src, kiln_path, _ = pairs[name]
    fields = _fields(kiln_path)
    arch = fields["general.architecture"]
    config = json.loads((src / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == head_dim


# --- the special-token rules, against gguf-py's own SpecialVocab -----------------------------------------

_ADDED = [{"id": i, "content": t, "special": True} for i, t in enumerate(
    ("<s>", "</s>", "<pad>", "<unk>", "<|eot|>", "<cls>", "<sep>", "<mask>"), start=10)]
_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}


def _template(single: list[str], pair: list[str]) -> dict[str, Any]:
    def part(x: str) -> dict[str, Any]:
        return {"Sequence": {"id": x, "type_id": 0}} if x in "AB" else {"SpecialToken": {"id": x, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [part(x) for x in single], "pair": [part(x) for x in pair]}


# (tokenizer.json post_processor and normalizer, tokenizer_config.json or None for none, config.json)
SPECIAL_CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]] = {
    "qwen-bos-null": ({"post_processor": _BYTELEVEL, "normalizer": {"type": "NFC"}},
                      {"bos_token": None, "eos_token": "</s>", "pad_token": "<pad>"},
                      {"bos_token_id": 1, "eos_token_id": 11}),
    "llama3-template": ({"post_processor": {"type": "Sequence", "processors": [
                             _BYTELEVEL, _template(["<s>", "A"], ["<s>", "A", "<s>", "B"])]}},
                        {"bos_token": "<s>", "eos_token": "<|eot|>", "add_bos_token": True},
                        {"bos_token_id": 10, "eos_token_id": [1, 14]}),
    "template-bos-eos-sep": ({"post_processor": _template(["<s>", "A", "</s>"], ["<s>", "A", "</s>", "</s>", "B", "</s>"])},
                             {"bos_token": "<s>", "eos_token": "</s>"}, {"pad_token_id": 12}),
    "template-ends-with-eot": ({"post_processor": _template(["<s>", "A", "<|eot|>"], ["<s>", "A", "<|eot|>", "B"])},
                               {"bos_token": "<s>", "eos_token": "</s>"}, {}),
    "roberta": ({"post_processor": {"type": "RobertaProcessing", "sep": ["<sep>", 16], "cls": ["<cls>", 15]}},
                {"unk_token": "<unk>", "mask_token": {"content": "<mask>"}}, {}),
    "cls-sep-only": ({"post_processor": _BYTELEVEL}, {"cls_token": "<cls>", "sep_token": "<sep>"}, {}),
    "no-tokenizer-config": ({"post_processor": _template(["<s>", "A"], ["<s>", "A", "<s>", "B"])}, None,
                            {"bos_token_id": 10, "eos_token_id": 11, "pad_token_id": 2}),
    "base-vocab-token": ({"post_processor": _BYTELEVEL}, {"eos_token": "b"}, {"eos_token_id": 1}),
    "normalizers": ({"post_processor": None, "normalizer": {"type": "Sequence", "normalizers": [
                        {"type": "NFD"}, {"type": "Lowercase"},
                        {"type": "BertNormalizer", "lowercase": False, "strip_accents": True}]}},
                    {"eos_token": "</s>", "add_eos_token": True}, {}),
}

_SPECIAL_VOCAB = """\
import json, sys
sys.path.insert(0, sys.argv[1])
import gguf
out = {}
for d in sys.argv[2:]:
    sv = gguf.SpecialVocab(d, load_merges=False)
    out[d] = {"ids": sv.special_token_ids, "add": sv.add_special_token,
              "lower": sv.normalizer_lowercase, "strip": sv.normalizer_strip_accents}
print(json.dumps(out))
"""


def test_special_tokens_follow_gguf_special_vocab(tmp_path) -> None:
    """kiln.checkpoint.tokenizer.special_tokens is a port of SpecialVocab (the converter's bundled gguf-py,
    which differs from the pip gguf kiln writes with): same ids and add-flags on every rule it has."""
    import subprocess
    import sys

    from kiln.checkpoint.tokenizer import normalizer_flags, special_tokens
    from kiln.fixtures.llama_converter import llama_converter

    vocab = {c: i for i, c in enumerate("abcdefghij")}
    tokens = [*vocab, *(t["content"] for t in _ADDED)]
    dirs = {}
    for name, (tok_json, tok_config, config) in SPECIAL_CASES.items():
        d = tmp_path / name
        d.mkdir()
        data = {"added_tokens": _ADDED, "model": {"type": "BPE", "vocab": vocab, "merges": []}, **tok_json}
        (d / "tokenizer.json").write_text(json.dumps(data))
        if tok_config is not None:
            (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
        (d / "config.json").write_text(json.dumps(config))
        dirs[name] = (d, data, tok_config, config)
    proc = subprocess.run([sys.executable, "-c", _SPECIAL_VOCAB, str(llama_converter() / "gguf-py"),
                           *(str(d) for d, *_ in dirs.values())], capture_output=True, text=True, check=True)
    theirs = json.loads(proc.stdout)
    for name, (d, data, tok_config, config) in dirs.items():
        ref = theirs[str(d)]
        ours = special_tokens(data, tok_config or {}, config, tokens, d / "tokenizer_config.json")
        # SpecialVocab fills the add-flags the post-processor leaves open from tokenizer_config.json;
        # read_tokenizer lets an explicit add_{type}_token win instead, as transformers 5 does.
        add = dict(ours.add)
        for typ in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
            if isinstance((tok_config or {}).get(f"add_{typ}_token"), bool) and tok_config:
                add.setdefault(typ, tok_config[f"add_{typ}_token"])
        ref_ids = {k: v for k, v in ref["ids"].items() if k != "cls"}  # cls has no GGUF key
        assert (ours.ids, add) == (ref_ids, ref["add"]), name
        assert normalizer_flags(data.get("normalizer")) == (ref["lower"], ref["strip"]), name
