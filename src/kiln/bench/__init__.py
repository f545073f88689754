"""Measure exported artifacts (`kiln bench`) and plan what fits a machine (`kiln plan`).

    from kiln.bench import BenchOptions, run_bench, plan
    report = run_bench(["out/m.q4_k_m.gguf"], BenchOptions(contexts=[512, 4096]), "out/bench")
    print(plan("path/to/checkpoint", 8 * 2**30).explanation)
"""

from kiln.bench.plan import Plan, plan
from kiln.bench.run import BenchOptions, run_bench

__all__ = ["BenchOptions", "Plan", "plan", "run_bench"]
