"""Where a block's tuning time goes: SignRound on the first blocks of SmolLM2-135M, timed per phase of the driver.

    .venv/bin/python benchmarks/block_time.py                 # blocks 0-1, W4G128 sym, iters 50, nsamples 64 x 256
    .venv/bin/python benchmarks/block_time.py --blocks 4 --iters 200
    .venv/bin/python benchmarks/block_time.py --blocks 4 --compile     # enable_torch_compile=True

Each phase is timed by wrapping the driver function that does it (wall clock, around the call): the float-target
pass and the quantised pass handed on (``run_block``; the first also gathers channel scaling's Gram matrices), the
channel-scaling search, the optimised-RTN start, the SignRound steps, the diagnostic per-layer losses. Timers, not
``torch.profiler``: on this CPU the profiler inflated big elementwise ops about tenfold. Prints a table and writes
JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time
import types

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)

# (label, driver attribute): the phases of ``driver._process_block``
PHASES = (("float targets + Gram (run_block #1), hand-on pass (run_block #2)", "run_block"),
          ("channel-scaling search (scale_block)", "scale_block"),
          ("optimised-RTN start (search_scales)", "search_scales"),
          ("SignRound steps (tune_block)", "tune_block"),
          ("diagnostic per-layer losses (layer_losses)", "layer_losses"),
          ("scaling-site probe (_scale_sites)", "_scale_sites"),
          ("packing (_pack_block)", "_pack_block"))


def timed(seconds: dict, key: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key].append(time.perf_counter() - start)
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--compile", action="store_true",
                   help="enable_torch_compile=True (the first block pays the compile)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "block_time.json"))
    args = p.parse_args()

    import torch

    from hf_autoround import AutoRound
    from hf_autoround.models import bundled_float_dir
    from hf_autoround.tuning import driver
    from tuning import float_layers, load_float

    seconds = collections.defaultdict(list)
    for _, name in PHASES:
        setattr(driver, name, timed(seconds, name, getattr(driver, name)))
    bench = types.SimpleNamespace(float_dir=bundled_float_dir(), blocks=args.blocks)
    model, tok = load_float(bench)
    ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters=args.iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=8, seed=42, progress=False, layer_config=float_layers(bench, model),
                   enable_torch_compile=args.compile)
    start = time.perf_counter()
    ar.quantize()
    total = time.perf_counter() - start
    rows = [{"phase": label, "calls": len(seconds[name]), "seconds_per_block": sum(seconds[name]) / args.blocks}
            for label, name in PHASES]
    steps = sum(seconds["tune_block"]) / (args.blocks * max(args.iters, 1))
    print(f"SmolLM2-135M blocks 0-{args.blocks - 1}, W4G128 sym, iters {args.iters}, nsamples {args.nsamples} x "
          f"{args.seqlen}, batch 8, {'torch.compile' if args.compile else 'eager'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'phase':70s} {'calls':>5s} {'s / block':>9s}")
    for r in rows:
        print(f"{r['phase']:70s} {r['calls']:5d} {r['seconds_per_block']:9.2f}")
    print(f"{'quantize() in all, per block':70s} {'':5s} {total / args.blocks:9.2f}")
    print(f"one SignRound step (forward, backward, update): {steps * 1e3:.1f} ms")
    write_json(args.json, {"args": vars(args), "rows": rows, "total_per_block_s": total / args.blocks,
                           "step_ms": steps * 1e3})


if __name__ == "__main__":
    main()
