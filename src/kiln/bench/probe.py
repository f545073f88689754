"""One benchmark configuration, measured in a process of its own.

Why a process per configuration: peak resident memory is a property of a process, and llama.cpp
and onnxruntime never hand memory back to the OS reliably; a fresh process per (artifact, context,
options) makes "peak RSS at context C" mean what a user running that configuration would see.
`kiln.bench.run` starts `python -m kiln.bench.probe SPEC_JSON` and reads one JSON line back.

Two kinds of probe:

* "kiln": kiln's own engine alone (LlamaCppEngine / OnnxEngine): time to first token for a prompt
  that fills the context (less room for generation), prompt tokens/s over it, then token
  generation at that depth for N particles (N sequences stepping together, as SMC runs them),
  peak RSS and the KV bytes the engine allocated.
* "pair": kiln's engine and the anchor (llama-cpp-python's high-level `Llama.generate`, or
  onnxruntime-genai's `Generator`) in one process on the same file, same prompt and threads,
  decoding in alternating chunks (ABBA), so their ratio is not at the mercy of drifts in machine
  load between processes: this is the harness-overhead check.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.formats import Format, require_format

WARM = 2  # untimed steps before each timed stretch (caches, thread pools)
CHUNK = 8  # timed steps per engine turn in a pair probe


@dataclass
class ProbeSpec:
    artifact: str
    kind: str  # "kiln" | "pair"
    context: int
    particles: int = 1
    n_gen: int = 32
    threads: int = 2
    kv_type: str = "f16"  # llama.cpp only
    flash_attn: bool = False  # llama.cpp only
    seed: int = 0


def status_kib() -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile of this process, in KiB (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def plan_tokens(spec: ProbeSpec, pair: bool = False) -> tuple[int, int]:
    """(prompt tokens, timed generation steps): the prompt fills the context less the generation room."""
    n_gen = max(4, min(spec.n_gen, (spec.context // 4) // spec.particles))
    if pair:  # 3x the steps: a ratio of two noisy rates needs more samples than either rate
        n_gen = max(CHUNK, min(3 * spec.n_gen, spec.context // 4) // CHUNK * CHUNK)
        room = n_gen + WARM * (n_gen // CHUNK) + 1
    else:
        room = spec.particles * (n_gen + WARM) + 1
    return spec.context - room, n_gen


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lo = min(100, vocab - 1)
    return rng.integers(lo, vocab, n).tolist()


# --- engines ------------------------------------------------------------------------------------

def _format(spec: ProbeSpec) -> Format:
    return require_format(Path(spec.artifact))


def _kiln_engine(spec: ProbeSpec, n_seq: int):
    """kiln's engine for the artifact; the KV type and flash attention apply where the format has them."""
    fmt = _format(spec)
    return fmt.open_engine(Path(spec.artifact), n_ctx=spec.context, n_seq_max=n_seq, threads=spec.threads,
                           **fmt.engine_options(kv_type=spec.kv_type, flash_attn=spec.flash_attn))


def _kv_bytes(engine) -> int | None:
    if hasattr(engine, "_k"):  # OnnxEngine: its preallocated past/present buffers
        return int(sum(a.nbytes for a in engine._k) + sum(a.nbytes for a in engine._v))
    from kiln import llamacpp_log

    mib = llamacpp_log.buffer_sizes().get("kv")
    return int(mib * 2 ** 20) if mib is not None else None


def _llama_buffers() -> dict[str, int]:
    from kiln import llamacpp_log

    return {k: int(v * 2 ** 20) for k, v in llamacpp_log.buffer_sizes().items()}


class KilnDecoder:
    """Greedy decoding of `rows` sequences with a kiln engine (argmax per row, as a sampler would pick)."""

    def __init__(self, engine, rows: int):
        self.e, self.rows = engine, rows
        self.tok: list[int] = []

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        logits = self.e.prefill(prompt, seq=0)
        self.tok = [int(np.argmax(logits))] * self.rows
        dt = time.perf_counter() - t0
        for s in range(1, self.rows):
            self.e.copy_seq(0, s)
        return dt

    def decode(self, n: int, warm: int = WARM) -> list[float]:
        seqs = list(range(self.rows))
        times = []
        for i in range(n + warm):
            t0 = time.perf_counter()
            logits = self.e.step(self.tok, seqs)
            self.tok = [int(t) for t in np.argmax(logits, axis=1)]
            if i >= warm:
                times.append(time.perf_counter() - t0)
        return times


class LlamaAnchor:
    """llama-cpp-python's plain high-level path: `Llama(...)` and `Llama.generate` (greedy)."""

    def __init__(self, spec: ProbeSpec):
        import llama_cpp

        t = getattr(llama_cpp, f"GGML_TYPE_{spec.kv_type.upper()}")
        self.llm = llama_cpp.Llama(model_path=spec.artifact, n_ctx=spec.context, n_batch=512, n_ubatch=512,
                                   n_threads=spec.threads, n_threads_batch=spec.threads,
                                   flash_attn=spec.flash_attn, type_k=t, type_v=t, verbose=False)
        self.gen = None

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        self.gen = self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        next(self.gen)  # prompt evaluated, first token sampled
        return time.perf_counter() - t0

    def decode(self, n: int, warm: int = WARM) -> list[float]:
        times = []
        for i in range(n + warm):
            t0 = time.perf_counter()
            next(self.gen)
            if i >= warm:
                times.append(time.perf_counter() - t0)
        return times


class GenaiAnchor:
    """onnxruntime-genai's `Generator` on the same directory (greedy, EOS masked by min_length)."""

    def __init__(self, spec: ProbeSpec):
        import onnxruntime_genai as og

        cfg = og.Config(spec.artifact)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": spec.threads, "inter_op_num_threads": 1, "log_severity_level": 3}}}}))
        self.model = og.Model(cfg)
        self.context = spec.context
        self.g = None

    def prefill(self, prompt: list[int]) -> float:
        import onnxruntime_genai as og

        p = og.GeneratorParams(self.model)
        p.set_search_options(max_length=self.context, min_length=self.context, do_sample=False)
        self.g = og.Generator(self.model, p)
        t0 = time.perf_counter()
        self.g.append_tokens(np.asarray([prompt], np.int32))
        self.g.generate_next_token()  # picks the first token from the prefill logits
        return time.perf_counter() - t0

    def decode(self, n: int, warm: int = WARM) -> list[float]:
        times = []
        for i in range(n + warm):
            t0 = time.perf_counter()
            self.g.generate_next_token()
            if i >= warm:
                times.append(time.perf_counter() - t0)
        return times


# each format's anchor: the engine library's own plain generation loop on the same artifact
ANCHORS: dict[str, type[LlamaAnchor] | type[GenaiAnchor]] = {"gguf": LlamaAnchor, "onnx": GenaiAnchor}


# --- probes -------------------------------------------------------------------------------------

def _import_runtime(spec: ProbeSpec) -> None:
    """Load the engine's libraries first, so the baseline RSS counts them and the rest is the model's."""
    _format(spec).preload()


def probe_kiln(spec: ProbeSpec) -> dict[str, Any]:
    _import_runtime(spec)
    base = status_kib()
    engine = _kiln_engine(spec, spec.particles)
    loaded = status_kib()
    prompt_len, n_gen = plan_tokens(spec)
    dec = KilnDecoder(engine, spec.particles)
    ttft = dec.prefill(_prompt(prompt_len, engine.vocab_size, spec.seed))
    times = dec.decode(n_gen)
    end = status_kib()
    out = {
        "prompt_tokens": prompt_len, "gen_steps": n_gen, "ttft_s": ttft, "pp_tok_s": prompt_len / ttft,
        "tg_tok_s": spec.particles / float(np.median(times)), "step_ms_median": 1e3 * float(np.median(times)),
        "kv_bytes_measured": _kv_bytes(engine), "rss_baseline_kib": base.get("VmRSS"),
        "rss_baseline_anon_kib": base.get("RssAnon"),
        "rss_loaded_kib": loaded.get("VmRSS"), "peak_rss_kib": end.get("VmHWM"),
        "rss_anon_kib": end.get("RssAnon"), "rss_file_kib": end.get("RssFile"),
    }
    if _format(spec).name == "gguf":  # llama.cpp logs its buffer sizes
        out["llama_buffers"] = _llama_buffers()
    engine.close()
    return out


def probe_pair(spec: ProbeSpec) -> dict[str, Any]:
    prompt_len, n_gen = plan_tokens(spec, pair=True)
    engine = _kiln_engine(spec, 1)
    kiln = KilnDecoder(engine, 1)
    anchor = ANCHORS[_format(spec).name](spec)
    prompt = _prompt(prompt_len, engine.vocab_size, spec.seed)
    ttft = {"kiln": kiln.prefill(prompt), "anchor": anchor.prefill(prompt)}
    times: dict[str, list[float]] = {"kiln": [], "anchor": []}
    engines = {"kiln": kiln, "anchor": anchor}
    order = ["kiln", "anchor", "anchor", "kiln"]
    for i in range(2 * (n_gen // CHUNK)):  # ABBA: each engine gets n_gen timed steps in all
        name = order[i % 4]
        times[name] += engines[name].decode(CHUNK)
    rate = {k: 1 / float(np.median(v)) for k, v in times.items()}  # medians: robust to load spikes
    engine.close()
    return {"prompt_tokens": prompt_len, "gen_steps": n_gen, "ttft_s": ttft["kiln"], "anchor_ttft_s": ttft["anchor"],
            "tg_tok_s": rate["kiln"], "anchor_tg_tok_s": rate["anchor"],
            "tg_ratio_kiln_over_anchor": rate["kiln"] / rate["anchor"],
            "step_ms_median": 1e3 * float(np.median(times["kiln"])),
            "anchor_step_ms_median": 1e3 * float(np.median(times["anchor"]))}


def run_probe(spec: ProbeSpec) -> dict[str, Any]:
    result = probe_pair(spec) if spec.kind == "pair" else probe_kiln(spec)
    return {"spec": asdict(spec), **result}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = ProbeSpec(**json.loads(argv[0]))
    try:
        result = run_probe(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line, not a traceback
        print(json.dumps({"spec": asdict(spec), "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
