"""LoRA merge (kiln.checkpoint.lora) against the real `peft` library on a tiny Llama.

The adapter is made by peft itself (random, non-zero B), saved in its own format, merged by kiln
with numpy, and the merged checkpoint's logits in transformers are compared with peft's
un-merged forward (base + s·B·A computed at run time).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.checkpoint.lora import merge_lora
from kiln.errors import KilnError

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _ids() -> "torch.Tensor":
    return torch.tensor([[1019, 5, 17, 300, 42, 999, 7, 128, 64, 3, 511, 800]])


def _make_adapter(base: Path, out: Path, **config) -> "torch.Tensor":
    """Save a peft adapter for `base` into `out`; return peft's logits (base + adapter, not merged)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,  # random, non-zero A and B
                           target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], **config)
    wrapped = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.mul_(10.0)  # a visible change of the logits, well above float32 rounding
            if "modules_to_save" in name:
                p.add_(0.5)  # the trained copy differs from the base tensor it replaces
        logits = wrapped(_ids()).logits[0]
    wrapped.save_pretrained(out)
    return logits


def _logits(checkpoint: Path) -> "torch.Tensor":
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        return model(_ids()).logits[0]


@pytest.mark.parametrize("rslora, save", [(False, None), (True, None), (False, ["norm"])])
def test_merged_logits_equal_peft_base_plus_adapter(tiny_llama_dir: Path, tmp_path: Path, rslora: bool,
                                                    save: list[str] | None) -> None:
    torch.set_num_threads(1)
    adapter = tmp_path / "adapter"
    expected = _make_adapter(tiny_llama_dir, adapter, use_rslora=rslora, modules_to_save=save)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_rslora"] is rslora and saved["r"] == 4
    info = merge_lora(tiny_llama_dir, adapter, tmp_path / "merged")
    assert info["adapted"] == 2 * 5 and info["ranks"] == [4]
    assert info["scales"] == [pytest.approx(16 / 2.0 if rslora else 16 / 4)]
    assert ("model.norm.weight" in info["replaced"]) is bool(save)  # peft matches every *norm module
    merged = _logits(tmp_path / "merged")
    base = _logits(tiny_llama_dir)
    effect = float((expected - base).abs().max())
    diff = float((merged - expected).abs().max())
    # float32: merging reassociates x·(W + sBA) vs x·W + s(x·A)·B; each logit is a sum over a few
    # hundred products of O(1) terms through 2 layers, so rounding stays near 1e-6 · |logit| · sqrt(k).
    assert effect > 0.5, f"the adapter barely changes the logits ({effect}): the comparison would be vacuous"
    assert diff < 2e-4 * max(1.0, float(expected.abs().max())), (diff, effect)


def test_merged_checkpoint_is_a_normal_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from kiln.checkpoint import load_checkpoint

    _make_adapter(tiny_llama_dir, tmp_path / "adapter")
    merge_lora(tiny_llama_dir, tmp_path / "adapter", tmp_path / "merged")
    ckpt = load_checkpoint(tmp_path / "merged")
    base = load_checkpoint(tiny_llama_dir)
    assert sorted(ckpt.tensors.names()) == sorted(base.tensors.names())
    same = "model.layers.0.self_attn.k_proj.weight"  # not a target: byte for byte
    assert np.array_equal(ckpt.tensors.load(same), base.tensors.load(same))
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (tiny_llama_dir / "tokenizer.json").read_bytes()


def _fake_adapter(path: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("config, tensors, message", [
    ({"use_dora": True}, {}, "DoRA"),
    ({"peft_type": "IA3"}, {}, "peft_type 'IA3'"),
    ({}, {"base_model.model.model.embed_tokens.weight": np.zeros((1024, 192), np.float32)},
     "modules_to_save with embeddings"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 192), np.float32)},
     "no matching lora_B"),
])
def test_unsupported_adapters_are_refused_in_one_line(tiny_llama_dir: Path, tmp_path: Path, config: dict,
                                                      tensors: dict, message: str) -> None:
    adapter = _fake_adapter(tmp_path / "adapter", config, tensors or {"x": np.zeros(1, np.float32)})
    with pytest.raises(KilnError, match=message) as err:
        merge_lora(tiny_llama_dir, adapter, tmp_path / "merged")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "merged").exists()
