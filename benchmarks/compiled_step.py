"""SignRound steps eager against ``enable_torch_compile=True``, side by side in one process, on SmolLM2-135M blocks.

    .venv/bin/python benchmarks/compiled_step.py               # blocks 0-3, W4G128 sym, iters 50, nsamples 64 x 256

Each mode quantises the same freshly loaded blocks with the same settings; the SignRound steps of each block are
timed around the driver's ``tune_block``. The compiled mode's first block also pays the compile (inductor keeps
compiled kernels on disk, so a second process compiles faster): its excess over the median of the later blocks
is reported as the compile time. Prints a table and writes JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import types

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)

from block_time import timed  # noqa: E402  (after the path set-up)


def run_mode(args, compile: bool) -> dict:
    from hf_autoround import AutoRound
    from hf_autoround.models import bundled_float_dir
    from hf_autoround.tuning import driver
    from tuning import float_layers, load_float

    seconds = collections.defaultdict(list)
    original = driver.tune_block
    driver.tune_block = timed(seconds, "tune_block", original)
    try:
        bench = types.SimpleNamespace(float_dir=bundled_float_dir(), blocks=args.blocks)
        model, tok = load_float(bench)
        ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters=args.iters, nsamples=args.nsamples,
                       seqlen=args.seqlen, batch_size=8, seed=42, progress=False,
                       layer_config=float_layers(bench, model), enable_torch_compile=compile)
        start = time.perf_counter()
        ar.quantize()
        total = time.perf_counter() - start
    finally:
        driver.tune_block = original
    blocks = seconds["tune_block"]
    later = statistics.median(blocks[1:]) if len(blocks) > 1 else blocks[0]
    return {"mode": "compiled" if compile else "eager", "tune_block_s": blocks, "quantize_s": total,
            "step_ms_later_blocks": later / args.iters * 1e3, "first_block_excess_s": blocks[0] - later,
            "best_losses": [b.best_loss for b in ar.report.blocks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "compiled_step.json"))
    args = p.parse_args()
    if args.blocks < 2:
        p.error("--blocks must be at least 2 (the first compiled block pays the compile)")

    import torch

    runs = [run_mode(args, compile=False), run_mode(args, compile=True)]
    print(f"SmolLM2-135M blocks 0-{args.blocks - 1}, W4G128 sym, iters {args.iters}, nsamples {args.nsamples} x "
          f"{args.seqlen}, batch 8, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'mode':9s} {'step ms (blocks 1+, median)':>28s} {'block 0 excess s':>17s} {'quantize() s':>13s}  "
          f"best block losses")
    for r in runs:
        losses = " ".join(f"{x:.5f}" for x in r["best_losses"])
        print(f"{r['mode']:9s} {r['step_ms_later_blocks']:28.1f} {r['first_block_excess_s']:17.1f} "
              f"{r['quantize_s']:13.1f}  {losses}")
    ratio = runs[1]["step_ms_later_blocks"] / runs[0]["step_ms_later_blocks"]
    print(f"compiled / eager: step time x{ratio:.2f}, quantize() x{runs[1]['quantize_s'] / runs[0]['quantize_s']:.2f}")
    write_json(args.json, {"args": vars(args), "runs": runs, "step_ratio": ratio})


if __name__ == "__main__":
    main()
