#!/usr/bin/env python
"""genlm-control's side of bench/smc.py: regex-constrained SMC on the same checkpoint and prompt.

It runs in its own virtual environment (genlm-control brings its own torch/transformers stack and
stays out of kiln's dependencies: the `genlm` extra of pyproject.toml names the pin), normally as a
long-lived subprocess of bench/smc.py, which interleaves its kiln runs with this worker's runs.

Protocol: JSON lines. stdin line 1 is the setup; the reply is {"ready": true, "settings": ...,
"versions": ...} (or {"error": ...}). Each further line {"run": {"sampler": "awrs"|"direct", "n": N,
"seeds": [...], "warm_prompt": bool}} gets {"reps": [{"seed", "wall_s", "prompt_s", "posterior", "log_ml",
"ess"}, ...]}.
{"quit": true} ends it. Library output goes to stderr; stdout carries only the protocol.

Setup keys: model (HF checkpoint dir), prompt_ids, regex, eos (token texts whose probabilities make
up EOS), max_tokens (genlm counts the final EOS: kiln's max_tokens + 1), ess_threshold, resampling,
threads, batch_size (default: the largest N), batch_timeout (seconds, default 0.001), prompt_text
(optional: checks that the HF tokenizer gives the same ids).

Samplers:
* "awrs": `AWRS(llm, BoolFSA.from_regex(regex).coerce(llm, f=b"".join))`, the library's sampler for
  Boolean constraints (its README's regex example): adaptive weighted rejection sampling, whose
  weight is an unbiased estimate of the allowed mass.
* "direct": `direct_token_sampler(llm * coerced_fsa)`: the exact masked proposal with the exact
  local normalizer (the AWRS paper's "twisted SMC" baseline) — the same proposal kiln uses.

Per run: the LM's token-trie cache of log-probs and the FSA's cache are cleared (not timed, so no
run reuses another's work); then the prompt's KV is cached (`llm.model.cache_kv`, the counterpart
of kiln's prefill): inside the timed region (timed separately as prompt_s as well) by default, or
before it with "warm_prompt" (the counterpart of kiln's prompt cache hit: a service that samples
repeatedly from one prompt keeps its KV); then the timed `sampler.smc(...)`.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
import traceback
import warnings
from importlib.metadata import PackageNotFoundError, distributions, version

EXAMPLE = """\
example (bench/smc.py starts it; by hand, with the venv bench/smc.py creates; one JSON object per line):
  G=${KILN_CACHE:-~/.cache/kiln}/venvs/genlm/bin/python
  SETUP='{"model": "'$HOME'/.cache/kiln/fixtures/smollm2-135m", "prompt_ids": [1, 4093, 198], "regex": "(Paris|Rome)\\\\.", "eos": ["<|endoftext|>", "<|im_end|>"], "max_tokens": 9, "ess_threshold": 0.5, "resampling": "systematic", "threads": 1}'
  printf '%s\\n' "$SETUP" '{"run": {"sampler": "awrs", "n": 4, "seeds": [0, 1]}}' '{"quit": true}' | $G bench/smc_genlm.py
"""


def log(msg: str) -> None:
    print(f"[genlm] {msg}", file=sys.stderr, flush=True)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("genlm-control", "genlm-backend", "genlm-grammar", "genlm-bytes", "torch", "transformers",
                 "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["nvidia_packages"] = sorted({d.metadata["Name"] for d in distributions()
                                     if (d.metadata["Name"] or "").lower().startswith("nvidia")})
    return out


class Worker:
    def __init__(self, setup: dict):
        import numpy as np
        import torch

        self.np, self.torch = np, torch
        threads = int(setup.get("threads", 1))
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        from genlm.control import BoolFSA, PromptedLLM

        t0 = time.perf_counter()
        self.setup = setup
        self.prompt_ids = [int(t) for t in setup["prompt_ids"]]
        self.batch_size = int(setup.get("batch_size") or 32)
        self.timeout = float(setup.get("batch_timeout", 0.001))
        model_dir = os.path.expanduser(setup["model"])
        self.llm = PromptedLLM.from_name(
            model_dir, backend="hf", eos_byte_strings=[e.encode() for e in setup["eos"]],
            prompt_ids=self.prompt_ids, temperature=1.0, batch_size=self.batch_size, timeout=self.timeout,
            hf_opts={"device_map": "cpu", "dtype": torch.float32})
        self.fsa = BoolFSA.from_regex(setup["regex"])
        self.coerced = self.fsa.coerce(self.llm, f=b"".join)
        self.samplers: dict = {}
        load_s = time.perf_counter() - t0
        hf_ids = None
        if setup.get("prompt_text"):
            hf_ids = self.llm.model.tokenizer.encode(setup["prompt_text"], add_special_tokens=False)
        model = self.llm.model.model
        self.settings = {
            "model": model_dir, "backend": "hf (genlm.backend.llm.AsyncTransformer)",
            "dtype": str(next(model.parameters()).dtype), "device": str(self.llm.model.device),
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
            "eos": setup["eos"], "eos_idxs": [int(i) for i in self.llm.token_maps.eos_idxs],
            "prompt_tokens": len(self.prompt_ids),
            "prompt_ids_match_hf_tokenizer": None if hf_ids is None else hf_ids == self.prompt_ids,
            "regex": setup["regex"], "max_tokens": int(setup["max_tokens"]),
            "ess_threshold": float(setup["ess_threshold"]), "resampling": setup.get("resampling", "multinomial"),
            "temperature": 1.0, "batch_size": self.batch_size, "batch_timeout_s": self.timeout,
            "load_s": round(load_s, 2), "llm_vocab": len(self.llm.vocab), "coerced_fsa_vocab": len(self.coerced.vocab),
        }
        log(f"loaded {model_dir} ({self.settings['dtype']}, {self.settings['device']}, "
            f"{torch.get_num_threads()} torch thread(s)) and the regex FSA in {load_s:.1f} s")

    def sampler(self, kind: str):
        s = self.samplers.get(kind)
        if s is None:
            from genlm.control import AWRS, direct_token_sampler

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "common vocabulary is less than 10%": expected for a regex
                if kind == "awrs":
                    s = AWRS(self.llm, self.coerced)
                elif kind == "direct":
                    s = direct_token_sampler(self.llm * self.coerced)
                else:
                    raise ValueError(f"unknown sampler {kind!r} (awrs | direct)")
            self.samplers[kind] = s
        return s

    async def run(self, kind: str, n: int, seeds: list[int], warm_prompt: bool = False) -> list[dict]:
        np, torch = self.np, self.torch
        sampler = self.sampler(kind)
        s = self.setup
        reps = []
        for seed in seeds:
            np.random.seed(seed)
            torch.manual_seed(seed)
            if hasattr(sampler, "rng"):
                sampler.rng = np.random.default_rng(seed)
            self.llm.model.clear_cache()  # log-prob trie: otherwise later runs reuse earlier runs' forwards
            self.fsa.clear_cache()
            if warm_prompt:
                self.llm.model.cache_kv(self.prompt_ids)
            t0 = time.perf_counter()
            if not warm_prompt:
                self.llm.model.cache_kv(self.prompt_ids)
            t1 = time.perf_counter()
            seqs = await sampler.smc(n_particles=int(n), ess_threshold=float(s["ess_threshold"]),
                                     max_tokens=int(s["max_tokens"]),
                                     resampling_method=s.get("resampling", "multinomial"))
            t2 = time.perf_counter()
            post = {str(k): float(v) for k, v in seqs.decoded_posterior.items()}
            reps.append({"seed": int(seed), "wall_s": t2 - t0, "prompt_s": t1 - t0, "posterior": post,
                         "log_ml": float(seqs.log_ml), "ess": float(seqs.ess)})
        return reps

    async def close(self) -> None:
        for s in self.samplers.values():
            try:
                await s.cleanup()
            except Exception:  # noqa: BLE001 - best effort
                pass


async def serve(proto) -> int:
    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    line = sys.stdin.readline()
    if not line:
        return 1
    try:
        worker = Worker(json.loads(line))
    except Exception as exc:  # noqa: BLE001 - report any failure to the parent
        send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(), "versions": versions()})
        return 1
    send({"ready": True, "settings": worker.settings, "versions": versions()})
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("quit"):
            break
        req = msg["run"]
        try:
            reps = await worker.run(req["sampler"], int(req["n"]), [int(x) for x in req["seeds"]],
                                    bool(req.get("warm_prompt", False)))
            send({"reps": reps})
        except Exception as exc:  # noqa: BLE001
            send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    await worker.close()
    return 0


def main() -> int:
    if len(sys.argv) > 1:
        print(__doc__)
        print(EXAMPLE)
        return 0 if sys.argv[1] in ("-h", "--help") else 2
    # Thread counts must be set before torch is imported.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, os.environ.get("KILN_BENCH_THREADS", "1"))
    proto = sys.stdout
    sys.stdout = sys.stderr  # libraries that print must not corrupt the protocol
    return asyncio.run(serve(proto))


if __name__ == "__main__":
    sys.exit(main())
