"""nanoGPT (karpathy/nanoGPT) training checkpoints: `ckpt.pt` with `model_args` and a `transformer.*` state dict.

These are what nanoGPT-style training configs (tiny / small / 150M / 350M_1024 / 750M_1024 in the
project's model-selection guide) write: a torch pickle holding the model's state dict (keys prefixed
`_orig_mod.` when the model was torch.compile'd) beside `model_args` (n_layer, n_head, n_embd,
block_size, bias, vocab_size). The model is GPT-2 with nn.Linear weights, exact-erf GELU and an
optional bias-free variant; kiln.checkpoint.gpt2.read_nanogpt reads it into kiln's GPT-2 form. It is a
pickle, so it is read only with --allow-pickle, through torch's weights_only loader; it has no
tokenizer of its own (pass --tokenizer DIR, or put tokenizer.json beside it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.families.gpt2 import GPT2
from kiln.families.registry import register


@register
class NanoGPT(GPT2):
    description = "a nanoGPT checkpoint (ckpt.pt)"
    architectures = ()
    claims_paths = True

    @classmethod
    def claims(cls, path: Path) -> bool:
        from kiln.checkpoint.gpt2 import is_nanogpt

        return is_nanogpt(path)

    @classmethod
    def claims_config(cls, config: dict[str, Any]) -> bool:
        return "block_size" in config and "n_embd" in config  # nanoGPT's model_args (cost model)

    @classmethod
    def read_gpt2(cls, path: Path, *, n_heads: int | None = None, tokenizer: str | Path | None = None,
                  allow_pickle: bool = False):
        from kiln.checkpoint.gpt2 import read_nanogpt

        return read_nanogpt(path, tokenizer=tokenizer, allow_pickle=allow_pickle)
