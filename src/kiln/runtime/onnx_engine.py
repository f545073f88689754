"""onnxruntime engine: kiln's own `InferenceSession` loop over an exported ONNX directory.

onnxruntime-genai's `Generator` is fast but offers no way to reorder its KV cache, which SMC
resampling needs, so kiln drives the graph itself (DESIGN.md §2):

* sequences are batch rows of one KV buffer per layer, ``[n_seq_max, kv_heads, n_ctx, head_dim]``;
* past and present are bound (IOBinding) to the *same* buffer, so GroupQueryAttention writes
  each new token in place at the row's own length, the way onnxruntime-genai runs these graphs
  ("past_present_share_buffer"); growing a fresh past every step halves decode speed at depth;
* each row carries its own length (the attention mask's row sum) and position (`position_ids`,
  added to the graph by kiln's exporter), so rows of different lengths step together and a
  sequence can start at any position;
* resampling gathers rows by an ancestor index array, copying only the filled part of the cache.

A hybrid graph (Qwen3.5: Gated DeltaNet layers beside attention ones) also has per-layer *states*
without a sequence axis (genai_config's past_conv_names / past_recurrent_names: a conv window and a
recurrent matrix per row), found by the session's input names and shaped by its input shapes. Each
is one buffer ``[n_seq_max, ...]`` bound as past and present (in place, as onnxruntime-genai runs
them; the CPU kernels read the past before writing the present), carried with the row: zeroed when
a row starts, gathered by `reorder`, kept aside while other rows step, stored whole in the prompt
cache. A state holds only the end of its tokens, so a cached prompt is reused only when all of it
is a prefix of the new prompt (`recurrent`; the llama.cpp engine's rule). A graph whose position_ids
input is [3, batch, seq] (MRoPE) gets the same position in all three rows (text).

Imports numpy, onnxruntime and tokenizers only: apps embed it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.jsonfile import read_json_object
from kiln.runtime.engine import Engine, default_threads, longest_prefix_match
from kiln.runtime.hf_tokens import TokenizersVocab

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

# End-of-turn markers of the supported chat templates (ChatML, Llama 3, Zephyr/Phi, Qwen).
EOG_TOKEN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise KilnError("running ONNX models needs onnxruntime (pip install 'kiln-llm[onnx]')") from None
    return onnxruntime


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except FileNotFoundError:
        raise KilnError(f"{path}: missing (not an ONNX model directory written by kiln or onnxruntime-genai)") from None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if isinstance(v, int)]


class OnnxEngine(TokenizersVocab, Engine):
    """Next-token logits for a batch of sequences from a GroupQueryAttention ONNX graph (with recurrent
    per-row states beside the KV cache where the graph has them)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_seq_max: int = 1,
                 threads: int | None = None, n_batch: int = 512, prompt_cache: int = 4):
        ort = _ort()
        self.path = Path(path)
        if not self.path.is_dir():
            raise KilnError(f"{self.path}: expected an ONNX model directory (with genai_config.json)")
        genai = _read_json(self.path / "genai_config.json")
        try:
            model = genai["model"]
            dec = model["decoder"]
            self.n_layers = int(dec["num_hidden_layers"])
            self.n_kv_heads = int(dec["num_key_value_heads"])
            self.head_dim = int(dec["head_size"])
            self.vocab_size = int(model["vocab_size"])
            self.context_length = int(model["context_length"])
            filename = dec["filename"]
            names = dec["inputs"], dec["outputs"]
        except (KeyError, TypeError, ValueError) as exc:
            raise KilnError(f"{self.path / 'genai_config.json'}: missing or malformed entry {exc}") from None
        self._in, self._out = names
        onnx_path = self.path / filename
        if not onnx_path.is_file():
            raise KilnError(f"{onnx_path}: missing")
        self.threads = threads or default_threads()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise KilnError(f"{onnx_path}: onnxruntime cannot load it: {str(exc).splitlines()[0][:300]}") from None
        inputs = {i.name: i for i in self._sess.get_inputs()}
        self._pos_name = self._in.get("position_ids", "position_ids")
        if self._pos_name not in inputs:
            raise KilnError(f"{onnx_path}: the graph has no position_ids input; export it with `kiln export onnx` "
                            "(onnxruntime-genai's own graphs derive positions from the mask only)")
        # [batch, seq], or [3, batch, seq] for MRoPE (every section at the text position)
        self._pos_rows = 3 if len(inputs[self._pos_name].shape) == 3 else 0
        # the layers with K/V (all of them, but a hybrid's recurrent ones) and the recurrent states
        try:
            self._kv_layers = [i for i in range(self.n_layers) if self._in["past_key_names"] % i in inputs]
        except (KeyError, TypeError):
            raise KilnError(f"{self.path / 'genai_config.json'}: decoder inputs name no past_key_names") from None
        if not self._kv_layers:
            raise KilnError(f"{onnx_path}: the graph has no {self._in['past_key_names'] % 0} input of any layer")
        kv_type = inputs[self._in["past_key_names"] % self._kv_layers[0]].type
        self._kv_dtype = _DTYPES.get(kv_type)
        if self._kv_dtype is None:
            raise KilnError(f"{onnx_path}: KV cache type {kv_type} is not supported")
        self.n_ctx_asked = int(n_ctx or min(self.context_length, 4096))
        self.n_ctx = min(self.n_ctx_asked, self.context_length)
        self.n_seq_max = int(n_seq_max)
        self.n_batch = n_batch
        shape = (self.n_seq_max, self.n_kv_heads, self.n_ctx, self.head_dim)
        self._k = [np.zeros(shape, self._kv_dtype) for _ in self._kv_layers]
        self._v = [np.zeros(shape, self._kv_dtype) for _ in self._kv_layers]
        # (past name, present name, buffer [n_seq_max, ...]) of every recurrent state
        self._states = self._state_buffers(inputs, onnx_path)
        self.recurrent = bool(self._states)
        self._len = np.zeros(self.n_seq_max, np.int64)  # tokens held per row
        self._pos = np.zeros(self.n_seq_max, np.int64)  # next position per row
        self._live: set[int] = set()
        self._bindings: dict[tuple[int, int], Any] = {}
        self._decoders: dict[tuple[int, int], Any] = {}
        self._ones = np.ones(self.n_seq_max * self.n_ctx, np.int64)
        # prompt cache: (tokens, last logits, K and V of every KV layer [kv_heads, len, head_dim], every recurrent
        # state [...]), least recently used first
        self._prompt_cache: list[tuple[tuple[int, ...], np.ndarray, list[np.ndarray], list[np.ndarray],
                                       list[np.ndarray]]] = []
        self._prompt_cache_size = int(prompt_cache)
        self._ort = ort
        self._load_tokenizer(genai)

    def _state_buffers(self, inputs: dict[str, Any], onnx_path: Path) -> list[tuple[str, str, np.ndarray]]:
        """A buffer per recurrent state input (genai_config's past_*_names other than K/V, e.g. past_conv_names
        and past_recurrent_names), shaped [n_seq_max, *the input's fixed dims]."""
        out = []
        for key, template in self._in.items():
            kv = key in ("past_key_names", "past_value_names")
            if kv or not (key.startswith("past_") and key.endswith("_names")):
                continue
            present = self._out.get("present_" + key[len("past_"):])
            for layer in range(self.n_layers):
                name = template % layer
                if name not in inputs:
                    continue
                dims, kind = inputs[name].shape, inputs[name].type
                dtype = _DTYPES.get(kind)
                fixed = dims[1:]
                if present is None or dtype is None or not all(isinstance(d, int) and d > 0 for d in fixed):
                    raise KilnError(f"{onnx_path}: state input {name} ({kind} {dims}) is not one kiln can carry "
                                    "(a fixed-size float state per batch row with a present output)")
                out.append((name, present % layer, np.zeros((self.n_seq_max, *fixed), dtype)))
        return out

    def context_text(self) -> str:
        """"the context of N" for messages, worded as LlamaCppEngine's: both sizes when the model's
        context length capped what was asked for."""
        if self.n_ctx_asked != self.n_ctx:
            return (f"the context of {self.n_ctx_asked} asked for (onnxruntime allocates {self.n_ctx}, "
                    "the model's context length)")
        return f"the context of {self.n_ctx}"

    # --- tokens -------------------------------------------------------------------------------
    def _load_tokenizer(self, genai: dict[str, Any]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise KilnError("running ONNX models needs the tokenizers package") from None
        tok_path = self.path / "tokenizer.json"
        if not tok_path.is_file():
            raise KilnError(f"{tok_path}: missing")
        try:
            self._tok = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # noqa: BLE001
            raise KilnError(f"{tok_path}: not a valid tokenizer ({exc})") from None
        cfg_path = self.path / "tokenizer_config.json"
        tcfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        template = tcfg.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        if not template and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        model = genai["model"]
        self.bos_id = next(iter(_ids(model.get("bos_token_id"))), None)
        probe = self._tok.encode("", add_special_tokens=True).ids
        self.add_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id
        eog = set(_ids(model.get("eos_token_id")))
        gen_path = self.path / "generation_config.json"
        if gen_path.is_file():
            eog.update(_ids(_read_json(gen_path).get("eos_token_id")))
        for text in EOG_TOKEN_TEXTS:
            tid = self._tok.token_to_id(text)
            if tid is not None:
                eog.add(tid)
        self.eog_ids = frozenset(eog)
        self._pieces = self._byte_table()

    # --- running the graph --------------------------------------------------------------------
    def _kv_binding(self, lo: int, hi: int, logits_first: bool = False):
        """A new IOBinding with rows lo..hi-1 of every KV buffer bound as both past and present."""
        ort = self._ort
        io = self._sess.io_binding()
        if logits_first:
            io.bind_output(self._out.get("logits", "logits"), "cpu")  # output 0, rebound every run
        for i, layer in enumerate(self._kv_layers):
            for bufs, past, present in ((self._k, "past_key_names", "present_key_names"),
                                        (self._v, "past_value_names", "present_value_names")):
                value = ort.OrtValue.ortvalue_from_numpy(bufs[i][lo:hi])
                io.bind_ortvalue_input(self._in[past] % layer, value)
                io.bind_ortvalue_output(self._out[present] % layer, value)
        for past, present, buf in self._states:  # updated in place, as onnxruntime-genai shares these buffers
            value = ort.OrtValue.ortvalue_from_numpy(buf[lo:hi])
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        return io

    def _positions(self, positions: np.ndarray) -> np.ndarray:
        """position_ids as the graph takes them: [B, S], or [3, B, S] (MRoPE: text has one position)."""
        positions = np.ascontiguousarray(positions, np.int64)
        return np.ascontiguousarray(np.broadcast_to(positions, (3, *positions.shape))) if self._pos_rows else positions

    def _binding(self, lo: int, hi: int):
        """The prefill binding of rows lo..hi-1 (logits of any length, allocated by onnxruntime)."""
        io = self._bindings.get((lo, hi))
        if io is None:
            io = self._bindings[(lo, hi)] = self._kv_binding(lo, hi, logits_first=True)
        return io

    def _run(self, lo: int, tokens: np.ndarray, lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One forward pass over rows lo..lo+B-1: `tokens` [B, S] appended after `lengths` [B] tokens,
        at `positions` [B, S]; returns logits [B, S, vocab]."""
        ort = self._ort
        b, s = tokens.shape
        total = lengths + s
        width = int(total.max())
        if width > self.n_ctx:
            raise KilnError(f"{width} tokens exceed {self.context_text()} (pass a larger n_ctx)")
        mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)
        io = self._binding(lo, lo + b)
        io.bind_cpu_input(self._in.get("input_ids", "input_ids"), np.ascontiguousarray(tokens, np.int64))
        io.bind_cpu_input(self._in.get("attention_mask", "attention_mask"), mask)
        io.bind_cpu_input(self._pos_name, self._positions(positions))
        io.bind_output(self._out.get("logits", "logits"), "cpu")
        try:
            self._sess.run_with_iobinding(io)
        except Exception as exc:  # noqa: BLE001
            raise KilnError(f"onnxruntime failed: {str(exc).splitlines()[0][:300]}") from None
        logits = io.get_outputs()[0].numpy()
        return logits.astype(np.float32, copy=False)

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq_max:
            raise KilnError(f"sequence id {seq} is out of range (this engine holds {self.n_seq_max} sequences)")

    def prefill(self, tokens: Sequence[int], seq: int = 0, all_logits: bool = False,
                start: int | None = None) -> np.ndarray:
        tokens = list(tokens)
        if not tokens:
            raise KilnError("nothing to prefill: empty token list")
        self._check_seq(seq)
        held = int(self._len[seq]) if seq in self._live else 0
        if start is not None and held:
            raise KilnError("a start position can only be given for an empty sequence")
        if held + len(tokens) > self.n_ctx:
            raise KilnError(f"{held + len(tokens)} tokens exceed {self.context_text()}")
        pos0 = int(self._pos[seq]) if held else int(start or 0)
        if pos0 + len(tokens) > self.context_length:
            raise KilnError(f"positions up to {pos0 + len(tokens)} exceed the model's context of "
                            f"{self.context_length}")
        self._live.add(seq)
        self._len[seq], self._pos[seq] = held, pos0
        if not held:  # a new sequence starts from zero states (K/V beyond its length are masked out)
            for _, _, buf in self._states:
                buf[seq] = 0
        out = np.empty((len(tokens), self.vocab_size), np.float32) if all_logits else None
        last = None
        for lo in range(0, len(tokens), self.n_batch):
            chunk = np.asarray(tokens[lo:lo + self.n_batch], np.int64)[None, :]
            n = chunk.shape[1]
            positions = (self._pos[seq] + np.arange(n))[None, :]
            logits = self._run(seq, chunk, self._len[seq:seq + 1], positions)[0]
            self._len[seq] += n
            self._pos[seq] += n
            if all_logits:
                out[lo:lo + n] = logits
            else:
                last = logits[-1].copy()
        return out if all_logits else last

    def step(self, tokens: Sequence[int], seqs: Sequence[int]) -> np.ndarray:
        seqs = [int(s) for s in seqs]
        if len(tokens) != len(seqs):
            raise KilnError(f"step: {len(tokens)} tokens for {len(seqs)} sequences")
        if not seqs:
            return np.empty((0, self.vocab_size), np.float32)
        if len(set(seqs)) != len(seqs):
            raise KilnError("step: a sequence appears twice")
        for s in seqs:
            self._check_seq(s)
            if s not in self._live:
                raise KilnError(f"step: sequence {s} holds no tokens (prefill it first)")
        lo, hi = min(seqs), max(seqs) + 1
        index = np.asarray(seqs) - lo
        if hi - lo == len(seqs):  # a contiguous block of rows (SMC, batched decoding): no scatter
            tok, positions = np.asarray(tokens, np.int64)[np.argsort(index)], self._pos[lo:hi]
        else:
            # Rows lo..hi-1 run together; a row not being stepped gets a dummy token at position 0
            # written one slot past its end (never read, overwritten by its next real token).
            tok = np.zeros(hi - lo, np.int64)
            tok[index] = np.asarray(tokens, np.int64)
            positions = np.zeros(hi - lo, np.int64)
            positions[index] = self._pos[seqs]
        full = [s for s in range(lo, hi) if self._len[s] >= self.n_ctx]
        if full:
            raise KilnError(f"sequence {full[0]} filled {self.context_text()}")
        if int(positions.max()) >= self.context_length:
            raise KilnError(f"positions beyond the model's context of {self.context_length}")
        # the dummy token would advance a skipped row's recurrent state: keep those rows' states aside
        stepped = set(seqs)
        skipped = [s for s in range(lo, hi) if s in self._live and s not in stepped] if self._states else []
        kept = [buf[skipped].copy() for _, _, buf in self._states] if skipped else []
        logits = self._decode(lo, tok, self._len[lo:hi], positions)
        for (_, _, buf), saved in zip(self._states, kept):
            buf[skipped] = saved
        self._len[seqs] += 1
        self._pos[seqs] += 1
        return logits[index]

    def _decode(self, lo: int, tokens: np.ndarray, lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token for each of rows lo..lo+B-1: the hot loop of decoding and SMC, so everything but the
        attention mask (its width grows every step) is bound once, to numpy arrays written in place,
        and logits land in a preallocated array (measured: halves the Python time per step)."""
        b = len(tokens)
        state = self._decoders.get((lo, b))
        if state is None:
            ort = self._ort
            io = self._kv_binding(lo, lo + b)
            ids = np.zeros((b, 1), np.int64)
            pos = np.zeros((3, b, 1) if self._pos_rows else (b, 1), np.int64)
            logits = np.empty((b, 1, self.vocab_size), np.float32)
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (ids, pos, logits)]
            io.bind_ortvalue_input(self._in.get("input_ids", "input_ids"), values[0])
            io.bind_ortvalue_input(self._pos_name, values[1])
            io.bind_ortvalue_output(self._out.get("logits", "logits"), values[2])
            state = self._decoders[(lo, b)] = (io, ids, pos, logits, values)
        io, ids, pos, logits, _ = state
        ids[:, 0] = tokens
        pos[..., 0] = positions  # broadcast over the MRoPE rows
        total = lengths + 1
        width = int(total.max())
        if int(total.min()) == width:
            mask = self._ones[:b * width].reshape(b, width)
        else:
            mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)
        io.bind_cpu_input(self._in.get("attention_mask", "attention_mask"), mask)
        try:
            self._sess.run_with_iobinding(io)
        except Exception as exc:  # noqa: BLE001
            raise KilnError(f"onnxruntime failed: {str(exc).splitlines()[0][:300]}") from None
        return logits[:, 0].copy()

    def prefill_prompt(self, tokens: Sequence[int], seq: int = 0, reserve: int = 0) -> np.ndarray:
        """Prefill through a small LRU cache of earlier prompts' KV (copies of their rows, a few MB per
        prompt for a small model): the longest common prefix is copied into the row and only the rest
        runs; an exact hit runs nothing and returns the stored logits. `reserve` is irrelevant here
        (every row has its own n_ctx cells).

        A recurrent graph's states exist only at the end of a cached prompt: a cached prompt is reused
        only when all of it is a prefix of this one, and where this prompt parts from a cached one the
        states there are cached too (a checkpoint: the next prompt sharing that prefix starts from it),
        as the llama.cpp engine does."""
        tokens = [int(t) for t in tokens]
        self._check_seq(seq)
        if not tokens or not self._prompt_cache_size or (seq in self._live and self._len[seq]):
            return self.prefill(tokens, seq=seq)
        usable = ((i, e[0]) for i, e in enumerate(self._prompt_cache)
                  if not self.recurrent or tuple(tokens[:len(e[0])]) == e[0])
        i, k = longest_prefix_match(usable, tokens)
        best = None if i is None else self._prompt_cache.pop(i)
        if best is not None:
            self._prompt_cache.append(best)  # most recently used
            exact = k == len(tokens) and k == len(best[0])
            if not exact:
                k = min(k, len(tokens) - 1)  # at least the last token runs, for its logits
            self._restore(seq, best, k)
            if exact:
                return best[1].copy()
        if self.recurrent:
            _, shared = longest_prefix_match(((j, e[0]) for j, e in enumerate(self._prompt_cache)), tokens)
            if k < shared < len(tokens):
                self._store(seq, tokens[:shared], self.prefill(tokens[k:shared], seq=seq))
                k = shared
        logits = self.prefill(tokens[k:], seq=seq)
        self._store(seq, tokens, logits)
        return logits

    def _restore(self, seq: int, entry: tuple, k: int) -> None:
        """Row `seq` holds the first k tokens of the cached prompt `entry` (all of it where states are cached)."""
        for bufs, saved in ((self._k, entry[2]), (self._v, entry[3])):
            for buf, arr in zip(bufs, saved):
                buf[seq, :, :k] = arr[:, :k]
        for (_, _, buf), arr in zip(self._states, entry[4]):
            buf[seq] = arr
        self._live.add(seq)
        self._len[seq] = self._pos[seq] = k

    def _store(self, seq: int, tokens: Sequence[int], logits: np.ndarray) -> None:
        """Cache row `seq` (holding `tokens`) as a prompt; one whose KV it holds is dropped (a recurrent
        graph's shorter prompts stay: their states are not in this one's)."""
        n, key = len(tokens), tuple(tokens)
        held = (lambda e: e[0] == key) if self.recurrent else (lambda e: key[:len(e[0])] == e[0])
        self._prompt_cache = [e for e in self._prompt_cache if not held(e)]
        self._prompt_cache.append((key, logits.copy(), [b[seq, :, :n].copy() for b in self._k],
                                   [b[seq, :, :n].copy() for b in self._v],
                                   [buf[seq].copy() for _, _, buf in self._states]))
        del self._prompt_cache[:-self._prompt_cache_size]

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    def cached_prompts(self) -> list[tuple[int, ...]]:
        """The prompts held, least recently used first."""
        return [e[0] for e in self._prompt_cache]

    def reorder(self, ancestors: Sequence[int], seqs: Sequence[int] | None = None) -> None:
        """Row seqs[i] becomes a copy of row ancestors[i] (all at once: a gather along the batch axis)."""
        dst = np.arange(len(ancestors)) if seqs is None else np.asarray(seqs, np.int64)
        src = np.asarray(ancestors, np.int64)
        if dst.shape != src.shape:
            raise KilnError(f"reorder: {len(src)} ancestors for {len(dst)} sequences")
        for s in (*src.tolist(), *dst.tolist()):
            self._check_seq(s)
        if np.array_equal(src, dst):
            return
        moved = src != dst
        src, dst = src[moved], dst[moved]
        width = int(self._len[src].max()) if len(src) else 0
        for bufs in (self._k, self._v):
            for buf in bufs:
                buf[dst, :, :width] = buf[src, :, :width]  # fancy indexing gathers first: safe in place
        for _, _, buf in self._states:
            buf[dst] = buf[src]
        self._len[dst] = self._len[src]
        self._pos[dst] = self._pos[src]
        for s, d in zip(src.tolist(), dst.tolist()):
            if s in self._live:
                self._live.add(d)
            else:
                self._live.discard(d)

    def copy_seq(self, src: int, dst: int) -> None:
        self.reorder([src], [dst])

    def drop_seq(self, seq: int) -> None:
        self._check_seq(seq)
        self._live.discard(seq)
        self._len[seq] = 0
        self._pos[seq] = 0

    def reset(self) -> None:
        self._live.clear()
        self._len[:] = 0
        self._pos[:] = 0

    def positions(self) -> dict[int, int]:
        return {s: int(self._len[s]) for s in sorted(self._live)}

    def close(self) -> None:
        self._bindings.clear()
        self._decoders.clear()
        self._sess = None
