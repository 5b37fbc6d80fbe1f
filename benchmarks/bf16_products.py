"""bf16 against float32 matrix products on this CPU: the measurement behind ``bf16_forward="auto"``.

    .venv/bin/python benchmarks/bf16_products.py

Times ``F.linear`` of each shape (rows x inputs x outputs: the tuned linears of SmolLM2-135M on a batch of
8 x 256 tokens, square ones, and a 7B-sized one) in float32 and in bf16, median of ``--runs`` after two warm-ups,
and prints the ratio float32 time / bf16 time (above 1: bf16 is faster). Also prints what ``bf16_speed()`` decided
(its own probe, the same as SignRound's "auto"). Prints a table and writes JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)

SHAPES = ((2048, 576, 1536), (2048, 1536, 576), (256, 1024, 1024), (512, 512, 512), (1024, 1024, 1024),
          (2048, 4096, 4096))


def main() -> None:
    import torch

    from hf_autoround.tuning.bf16_matmul import bf16_speed, native_bf16, product_seconds

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bf16_products.json"))
    args = p.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 flag: {native_bf16()}")
    print(f"{'shape (rows x in x out)':>26} {'float32 ms':>11} {'bf16 ms':>9} {'f32/bf16':>9}")
    for shape in SHAPES:
        f32 = product_seconds(torch.float32, shape, runs=args.runs, summary=statistics.median)
        bf16 = product_seconds(torch.bfloat16, shape, runs=args.runs, summary=statistics.median)
        rows.append({"shape": list(shape), "float32_ms": f32 * 1e3, "bf16_ms": bf16 * 1e3, "ratio": f32 / bf16})
        print(f"{'x'.join(map(str, shape)):>26} {f32 * 1e3:11.2f} {bf16 * 1e3:9.2f} {f32 / bf16:8.2f}x")
    start = time.perf_counter()
    speed = bf16_speed()
    probe_s = time.perf_counter() - start
    print(f"bf16_speed() in {probe_s:.2f} s: {speed.describe()}; bf16_forward/bf16_backward 'auto' -> {speed.faster}")
    write_json(args.json, {"rows": rows, "auto_ratio": speed.ratio, "auto_bf16": speed.faster, "probe_s": probe_s,
                           "capability": torch.backends.cpu.get_cpu_capability(),
                           "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
