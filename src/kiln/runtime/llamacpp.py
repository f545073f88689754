"""llama.cpp engine: one context, many sequences, through llama-cpp-python's C API.

The high-level `llama_cpp.Llama` class keeps a single sequence; SMC and batched
decoding need several sequences in one `llama_decode`, so kiln drives the C API
(`llama_batch`, `llama_decode`, `llama_get_logits_ith`, `llama_memory_seq_*`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.bytelevel import describe, essential_missing, missing_bytes
from kiln.runtime.engine import Engine, default_threads, longest_prefix_match


def _llama():
    try:
        import llama_cpp
    except ImportError:
        raise KilnError("running GGUF files needs llama-cpp-python (pip install 'kiln-llm[llama]')") from None
    from kiln import llamacpp_log

    llamacpp_log.install()
    return llama_cpp


_MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids a context can hold
PROMPT_CACHE_SLOTS = 4  # cached prompts an engine keeps by default (hidden sequence ids after the caller's)


class LlamaCppEngine(Engine):
    shared_kv_pool = True  # one KV pool of n_ctx cells for every sequence (SMC's capacity check)

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_seq_max: int = 1,
                 threads: int | None = None, n_batch: int = 512, flash_attn: bool | None = None,
                 type_k: int | None = None, type_v: int | None = None, kv_unified: bool = True,
                 prompt_cache: int = PROMPT_CACHE_SLOTS):
        lc = _llama()
        from kiln import llamacpp_log

        self._lc = lc
        self.path = Path(path)
        if not self.path.is_file():
            raise KilnError(f"{self.path}: no such GGUF file")
        self._check_gguf()
        mparams = lc.llama_model_default_params()
        llamacpp_log.clear()
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise KilnError(f"{self.path}: llama.cpp could not load the model: {llamacpp_log.last_error()}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.vocab_size = lc.llama_vocab_n_tokens(self._vocab)
        self.context_length = lc.llama_model_n_ctx_train(self._model)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx or min(self.context_length, 4096)
        self.n_ctx_asked = int(cparams.n_ctx)  # llama.cpp rounds it up (to a multiple of 256): see context_text
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        # A recurrent or hybrid model (Qwen3.5's Gated DeltaNet layers) holds one state per sequence (one
        # recurrent cell per sequence id), the state after its last token: it cannot be cut back to a
        # shorter prefix the way K/V cells can. Copying a whole sequence is exact (llama.cpp shares the
        # cell and copies it on the next write), so SMC's forks work unchanged; the prompt cache reuses a
        # cached prompt only when all of it is a prefix of the new one (see prefill_prompt).
        self.recurrent = any(bool(getattr(lc, fn)(self._model)) for fn in ("llama_model_is_recurrent",
                                                                         "llama_model_is_hybrid")
                             if hasattr(lc, fn))
        # Cached prompts live in hidden sequence ids after the caller's (their cells are shared with
        # the sequences copied from them, so a prompt in use costs no extra cells). A split cache
        # would give every hidden id its own slice of n_ctx: only the unified one gets a cache.
        cache_ok = kv_unified
        self._slots = list(range(n_seq_max, min(n_seq_max + prompt_cache, _MAX_SEQ))) if cache_ok else []
        self._cached: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}  # slot -> (prompt, last logits)
        self._lru: list[int] = []  # slots, least recently used first
        cparams.n_seq_max = n_seq_max + len(self._slots)
        cparams.n_outputs_max_per_seq = 0  # allow logits at every position (scoring, eval)
        t = threads or default_threads()
        cparams.n_threads = t
        cparams.n_threads_batch = t
        cparams.kv_unified = kv_unified
        if flash_attn is not None:
            cparams.flash_attn_type = 1 if flash_attn else 0
        if type_k is not None:
            cparams.type_k = type_k
        if type_v is not None:
            cparams.type_v = type_v
        llamacpp_log.clear(sizes=False)
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise KilnError(f"{self.path}: llama.cpp could not create a context: {llamacpp_log.last_error()}")
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self._mem = lc.llama_get_memory(self._ctx)
        self._pos: dict[int, int] = {}  # next position of each sequence
        self._len: dict[int, int] = {}  # tokens each sequence holds (the context budget)
        self.bos_id = self._opt(lc.llama_vocab_bos(self._vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self.eog_ids = frozenset(i for i in self._special_ids() if lc.llama_vocab_is_eog(self._vocab, i))
        self.chat_template = self.meta("tokenizer.chat_template")
        self._batch = lc.llama_batch_init(max(n_batch, n_seq_max), 0, 1)
        self._piece_cache: dict[int, bytes] = {}

    def _check_gguf(self) -> None:
        # Checked before llama.cpp sees it: llama.cpp aborts the process on some malformed vocabularies.
        from kiln.gguf_header import read_header

        fields = read_header(self.path, ("tokenizer.ggml.model", "tokenizer.ggml.tokens"))
        self._unrepresentable = b""
        if fields.get("tokenizer.ggml.model") == "gpt2":
            tokens = [t.decode("utf-8", errors="replace") for t in fields.get("tokenizer.ggml.tokens") or []]
            missing = missing_bytes(tokens)
            essential = essential_missing(missing)
            if essential:
                raise KilnError(f"{self.path}: byte-level vocabulary lacks byte tokens for {describe(essential)}; "
                                "llama.cpp would abort on ordinary text")
            self._unrepresentable = bytes(sorted(missing))

    def context_text(self) -> str:
        """"the context of N" for messages, naming both sizes when llama.cpp allocated another than was
        asked for (it rounds up): a user who passed --ctx 16 should not read only "256"."""
        if self.n_ctx_asked != self.n_ctx:
            return f"the context of {self.n_ctx_asked} asked for (llama.cpp allocates {self.n_ctx})"
        return f"the context of {self.n_ctx}"

    @staticmethod
    def _opt(token: int) -> int | None:
        return token if token >= 0 else None

    def _special_ids(self) -> list[int]:
        lc = self._lc
        ids = []
        for fn in ("llama_vocab_eos", "llama_vocab_eot", "llama_vocab_sep", "llama_vocab_pad"):
            if hasattr(lc, fn):
                tid = getattr(lc, fn)(self._vocab)
                if tid >= 0:
                    ids.append(tid)
        # also any control token the vocab flags as end-of-generation
        ids.extend(i for i in range(self.vocab_size) if lc.llama_vocab_get_attr(self._vocab, i) & 8)
        return sorted(set(ids))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        if self._unrepresentable and len(data.translate(None, self._unrepresentable)) != len(data):
            bad = sorted(set(data) & set(self._unrepresentable))
            raise KilnError(f"text contains byte(s) {describe(bad)} that this model's vocabulary cannot represent "
                            "(llama.cpp would abort)")
        cap = len(data) + 16
        arr = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), arr, cap, add_special, parse_special)
        return list(arr[:n])

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            piece = self._piece_cache[token] = buf.raw[:max(n, 0)]
        return piece

    # --- sequences ----------------------------------------------------------------------------
    def positions(self) -> dict[int, int]:
        return dict(self._len)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, pos, seq, want_logits), at most n_batch of them."""
        b = self._batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        rc = self._lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise KilnError(f"llama_decode failed (code {rc}): {self.context_text()} may be full")

    def _logits(self, i: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()

    def prefill(self, tokens: Sequence[int], seq: int = 0, all_logits: bool = False,
                start: int | None = None) -> np.ndarray:
        tokens = list(tokens)
        if not tokens:
            raise KilnError("nothing to prefill: empty token list")
        held = self._len.get(seq, 0)
        if start is not None and held:
            raise KilnError("a start position can only be given for an empty sequence")
        if held + len(tokens) > self.n_ctx:
            raise KilnError(f"{held + len(tokens)} tokens exceed {self.context_text()}")
        start = self._pos.get(seq, 0) if start is None else start
        out = np.empty((len(tokens), self.vocab_size), dtype=np.float32) if all_logits else None
        last = None
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo:lo + self.n_batch]
            final = lo + len(chunk) == len(tokens)
            entries = [(t, start + lo + j, seq, all_logits or (final and j == len(chunk) - 1))
                       for j, t in enumerate(chunk)]
            self._decode(entries)
            if all_logits:
                for j in range(len(chunk)):
                    out[lo + j] = self._logits(j)
            elif final:
                last = self._logits(len(chunk) - 1)
        self._pos[seq] = start + len(tokens)
        self._len[seq] = held + len(tokens)
        return out if all_logits else last

    def step(self, tokens: Sequence[int], seqs: Sequence[int]) -> np.ndarray:
        entries = []
        for tok, seq in zip(tokens, seqs, strict=True):
            pos = self._pos.get(seq, 0)
            if self._len.get(seq, 0) >= self.n_ctx:
                raise KilnError(f"sequence {seq} filled {self.context_text()}")
            entries.append((int(tok), pos, seq, True))
        out = np.empty((len(entries), self.vocab_size), dtype=np.float32)
        for lo in range(0, len(entries), self.n_batch):
            chunk = entries[lo:lo + self.n_batch]
            self._decode(chunk)
            for j in range(len(chunk)):
                out[lo + j] = self._logits(j)
        for seq in seqs:
            self._pos[seq] = self._pos.get(seq, 0) + 1
            self._len[seq] = self._len.get(seq, 0) + 1
        return out

    def copy_seq(self, src: int, dst: int) -> None:
        if src == dst:
            return
        self._lc.llama_memory_seq_rm(self._mem, dst, -1, -1)
        self._lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        self._pos[dst] = self._pos.get(src, 0)
        self._len[dst] = self._len.get(src, 0)

    def drop_seq(self, seq: int) -> None:
        self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._pos.pop(seq, None)
        self._len.pop(seq, None)

    def reset(self) -> None:
        if self._cached:  # keep the cached prompts' cells
            for seq in list(self._pos):
                self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        else:
            self._lc.llama_memory_clear(self._mem, True)
        self._pos.clear()
        self._len.clear()

    # --- prompt cache -------------------------------------------------------------------------
    def prefill_prompt(self, tokens: Sequence[int], seq: int = 0, reserve: int = 0) -> np.ndarray:
        """Prefill through a small LRU cache of earlier prompts, held as hidden sequences: the longest
        common prefix is copied (`llama_memory_seq_cp`, no decode) and only the rest is decoded; an
        exact hit decodes nothing and returns the stored logits, which are the ones the first
        prefill produced. What llama-server's prompt cache does, per engine."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise KilnError("nothing to prefill: empty token list")
        if not self._slots or self._len.get(seq, 0):
            return self.prefill(tokens, seq=seq)
        lc, mem = self._lc, self._mem
        # a recurrent state exists only at the end of its prompt: reuse a cached prompt whole or not at all
        usable = ((slot, held) for slot, (held, _) in self._cached.items()
                  if not self.recurrent or tuple(tokens[:len(held)]) == held)
        best, k = longest_prefix_match(usable, tokens)
        # cells cached prompts hold beyond what this prompt shares stay occupied: evict (least recently
        # used first, the best match last) until this prompt, the caller's reserve and the live sequences fit
        def over() -> bool:
            held = sum(len(self._cached[s][0]) for s in self._cached) - k
            return held + len(tokens) + reserve + sum(self._len.values()) > self.n_ctx

        for slot in [s for s in self._lru if s != best] + ([best] if best is not None else []):
            if not over():
                break
            self._evict(slot)
            if slot == best:
                best, k = None, 0
        if best is not None:
            self._lru.remove(best)
            self._lru.append(best)
            lc.llama_memory_seq_cp(mem, best, seq, -1, -1)
            if k == len(tokens) and k == len(self._cached[best][0]):
                self._pos[seq] = self._len[seq] = k
                return self._cached[best][1].copy()
            if k == len(tokens):  # the prompt is a proper prefix of a cached one: re-run its last token
                k -= 1
            lc.llama_memory_seq_rm(mem, seq, k, -1)
            self._pos[seq] = self._len[seq] = k
        if self.recurrent:
            # Where this prompt parts from a cached one, keep the state there too (llama-server's context
            # checkpoints do the same): the next prompt sharing that prefix (one system prompt, one
            # document, different questions) then starts from it. The prefill is only split, not repeated.
            _, shared = longest_prefix_match(((s, h) for s, (h, _) in self._cached.items()), tokens)
            if k < shared < len(tokens):
                self._store(seq, tokens[:shared], self.prefill(tokens[k:shared], seq=seq), None)
                k = shared
        logits = self.prefill(tokens[k:], seq=seq)
        # a K/V prompt extending the cached one holds it whole: replace it (a recurrent state does not)
        extended = best is not None and len(self._cached[best][0]) == k and not self.recurrent
        self._store(seq, tokens, logits, best if extended else None)
        return logits

    def _store(self, seq: int, prompt: Sequence[int], logits: np.ndarray, slot: int | None) -> None:
        """Cache `seq`'s cells (its whole prompt so far) as `prompt` in `slot`, else a free or the least
        recently used slot."""
        if slot is None:
            free = [s for s in self._slots if s not in self._cached]
            slot = free[0] if free else self._lru[0]
        if slot in self._cached:
            self._evict(slot)
        self._lc.llama_memory_seq_cp(self._mem, seq, slot, -1, -1)
        self._cached[slot] = (tuple(prompt), logits.copy())
        self._lru.append(slot)

    def _evict(self, slot: int) -> None:
        self._lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._cached.pop(slot, None)
        if slot in self._lru:
            self._lru.remove(slot)

    def clear_prompt_cache(self) -> None:
        for slot in list(self._cached):
            self._evict(slot)

    def cached_prompts(self) -> list[tuple[int, ...]]:
        """The prompts held, least recently used first."""
        return [self._cached[s][0] for s in self._lru]

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._lc.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
