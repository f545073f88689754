"""The reference engine: a transformers model in float32 behind the `Engine` contract.

It runs the source checkpoint itself (loaded exactly as `kiln.verify.reference.Reference` loads it
for verification, so Arbor's Llama-layout checkpoints work too), which makes it the ground truth
the GGUF and ONNX engines are compared with in tests. It is not built for speed: every sequence
keeps its own key/value tensors, and `step` batches the sequences that hold equally many tokens
(one forward pass per distinct length).

It lives in `kiln.verify` (beside the reference it wraps), not in `kiln.runtime`, which never
imports checkpoint code or torch (DESIGN.md §1); torch and transformers load when one is created.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.jsonfile import read_json_object
from kiln.runtime.engine import Engine
from kiln.runtime.hf_tokens import TokenizersVocab

# End-of-turn markers of the supported chat templates (the same list as the ONNX engine's, so the
# engines agree on what ends a generation).
EOG_TOKEN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


class TransformersEngine(TokenizersVocab, Engine):
    """Float32 transformers model; sequences are independent `DynamicCache`s."""

    def __init__(self, model_dir: str | Path, n_seq_max: int = 1, n_ctx: int | None = None,
                 threads: int | None = None):
        try:
            import torch
        except ImportError:
            raise KilnError("the transformers engine needs torch and transformers "
                            "(pip install 'kiln-llm[torch]')") from None
        from kiln.verify.reference import Reference

        self.path = Path(model_dir)
        if not self.path.is_dir():
            raise KilnError(f"{self.path}: expected a checkpoint directory")
        self._torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        self.model = Reference(self.path).model
        config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 4096)
        self.n_ctx = min(int(n_ctx or min(self.context_length, 4096)), self.context_length)
        self.n_seq_max = int(n_seq_max)
        self._kv: dict[int, list[tuple[Any, Any]]] = {}  # per layer (keys, values), [1, heads, n, dim]
        self._pos: dict[int, int] = {}  # next position of each sequence
        self._len: dict[int, int] = {}  # tokens each sequence holds
        self._load_tokenizer(config)

    # --- tokens -------------------------------------------------------------------------------
    def _load_tokenizer(self, config: Any) -> None:
        from tokenizers import Tokenizer

        tok_path = self.path / "tokenizer.json"
        if not tok_path.is_file():
            raise KilnError(f"{tok_path}: missing")
        try:
            self._tok = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
            raise KilnError(f"{tok_path}: not a valid tokenizer ({exc})") from None
        tcfg = _json(self.path / "tokenizer_config.json")
        template = tcfg.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        if not template and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        gen = _json(self.path / "generation_config.json")
        self.bos_id = next(iter(_ids(gen.get("bos_token_id")) + _ids(getattr(config, "bos_token_id", None))), None)
        probe = self._tok.encode("", add_special_tokens=True).ids
        self.add_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id
        eog = set(_ids(getattr(config, "eos_token_id", None))) | set(_ids(gen.get("eos_token_id")))
        for text in EOG_TOKEN_TEXTS:
            tid = self._tok.token_to_id(text)
            if tid is not None:
                eog.add(tid)
        self.eog_ids = frozenset(t for t in eog if 0 <= t < self.vocab_size)
        self._pieces = self._byte_table()

    # --- sequences ----------------------------------------------------------------------------
    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq_max:
            raise KilnError(f"sequence id {seq} is out of range (this engine holds {self.n_seq_max} sequences)")

    def _forward(self, seqs: Sequence[int], tokens: Sequence[Sequence[int]], starts: Sequence[int]) -> np.ndarray:
        """One forward pass over sequences whose caches have the same length; returns [B, S, vocab]."""
        torch = self._torch
        from transformers import DynamicCache

        held = [self._kv.get(s) for s in seqs]
        config = self.model.config
        if held[0] is None:
            cache = DynamicCache(config=config)
        else:
            data = [(torch.cat([h[layer][0] for h in held]), torch.cat([h[layer][1] for h in held]))
                    if len(held) > 1 else held[0][layer] for layer in range(len(held[0]))]
            cache = DynamicCache(ddp_cache_data=data, config=config)
        ids = torch.tensor([list(t) for t in tokens], dtype=torch.long)
        pos = torch.tensor([list(range(p, p + len(t))) for p, t in zip(starts, tokens)], dtype=torch.long)
        with torch.no_grad():
            out = self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for i, s in enumerate(seqs):  # tensors are never written in place (the cache grows by cat): share them
            self._kv[s] = [(k[i:i + 1], v[i:i + 1]) for k, v in layers]
        return out.logits.float().numpy()

    def prefill(self, tokens: Sequence[int], seq: int = 0, all_logits: bool = False,
                start: int | None = None) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise KilnError("nothing to prefill: empty token list")
        self._check_seq(seq)
        held = self._len.get(seq, 0)
        if start is not None and held:
            raise KilnError("a start position can only be given for an empty sequence")
        if held + len(tokens) > self.n_ctx:
            raise KilnError(f"{held + len(tokens)} tokens exceed the engine's context of {self.n_ctx}")
        pos0 = self._pos[seq] if held else int(start or 0)
        if not held:
            self._kv.pop(seq, None)
        logits = self._forward([seq], [tokens], [pos0])[0]
        self._len[seq] = held + len(tokens)
        self._pos[seq] = pos0 + len(tokens)
        return logits.copy() if all_logits else logits[-1].copy()

    def step(self, tokens: Sequence[int], seqs: Sequence[int]) -> np.ndarray:
        """One token per sequence; sequences holding the same number of tokens run as one batch."""
        seqs = [int(s) for s in seqs]
        if len(tokens) != len(seqs):
            raise KilnError(f"step: {len(tokens)} tokens for {len(seqs)} sequences")
        if len(set(seqs)) != len(seqs):
            raise KilnError("step: a sequence appears twice")
        for s in seqs:
            self._check_seq(s)
            if s not in self._len:
                raise KilnError(f"step: sequence {s} holds no tokens (prefill it first)")
            if self._len[s] >= self.n_ctx:
                raise KilnError(f"sequence {s} reached the engine's context of {self.n_ctx} tokens")
        out = np.empty((len(seqs), self.vocab_size), np.float32)
        groups: dict[int, list[int]] = {}
        for row, s in enumerate(seqs):
            groups.setdefault(self._len[s], []).append(row)
        for rows in groups.values():
            group = [seqs[r] for r in rows]
            logits = self._forward(group, [[int(tokens[r])] for r in rows], [self._pos[s] for s in group])
            out[rows] = logits[:, -1]
        for s in seqs:
            self._len[s] += 1
            self._pos[s] += 1
        return out

    def copy_seq(self, src: int, dst: int) -> None:
        self._check_seq(src)
        self._check_seq(dst)
        if src == dst:
            return
        if src not in self._len:
            self.drop_seq(dst)
            return
        self._kv[dst] = list(self._kv[src])  # cache tensors are immutable here: sharing them is a copy
        self._len[dst] = self._len[src]
        self._pos[dst] = self._pos[src]

    def drop_seq(self, seq: int) -> None:
        self._kv.pop(seq, None)
        self._len.pop(seq, None)
        self._pos.pop(seq, None)

    def reset(self) -> None:
        self._kv.clear()
        self._len.clear()
        self._pos.clear()

    def positions(self) -> dict[int, int]:
        return dict(self._len)

    def close(self) -> None:
        self.reset()
