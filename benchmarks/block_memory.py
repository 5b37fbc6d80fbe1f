"""Where the tuning's peak RSS is reached: SignRound on SmolLM2-135M cut to its first blocks, RSS sampled by phase.

    .venv/bin/python benchmarks/block_memory.py                            # 4 blocks, nsamples 128 x 512, iters 5
    .venv/bin/python benchmarks/block_memory.py --nsamples 64 --seqlen 256

A thread reads the process's resident set every 5 ms and keeps, per phase of the driver, the highest value seen
while that phase ran (the innermost running phase wins). The phases are the driver's functions, wrapped as in
``block_time.py``. The model keeps only its first ``--blocks`` blocks, so that the calibration set's hidden states,
not the float weights, dominate, as in the issue's 4-block protocol. Memory hardly depends on ``--iters``, so the
default is short. Prints a table and writes JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import threading
import time
import types

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)

PHASES = ("capture_block_inputs", "run_block", "scale_block", "search_scales", "tune_block", "layer_losses",
          "chunked_mse", "_pack_block")
_PAGE = os.sysconf("SC_PAGE_SIZE")  # Linux only, like /proc/self/statm


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


class PhasePeaks:
    """Highest RSS per running phase, sampled by a daemon thread."""

    def __init__(self, period_s: float = 0.005):
        self.stack, self.peaks, self.period_s = ["outside quantize()"], collections.defaultdict(float), period_s
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            value, phase = rss_mib(), self.stack[-1]
            self.peaks[phase] = max(self.peaks[phase], value)
            time.sleep(self.period_s)

    def wrap(self, module, name: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def labelled(*args, **kwargs):
            self.stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
        setattr(module, name, labelled)


def _noting_hidden(capture, into: dict):
    """``capture_block_inputs`` that notes the dtype and size of the hidden states it returns (holding nothing)."""
    @functools.wraps(capture)
    def noting(*args, **kwargs):
        inputs = capture(*args, **kwargs)
        into.update(dtype=str(inputs.hidden.dtype).removeprefix("torch."), mib=inputs.hidden.nbytes / 2**20)
        return inputs
    return noting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4, help="keep only the first N blocks of the model")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--cache-dtype", default=None, help="AutoRound's cache_dtype (default: the package's choice)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "block_memory.json"))
    args = p.parse_args()

    from hf_autoround import AutoRound
    from hf_autoround.models import bundled_float_dir
    from hf_autoround.tuning import driver
    from tuning import load_float

    peaks = PhasePeaks()
    for name in PHASES:
        peaks.wrap(driver, name)
    hidden = {}
    driver.capture_block_inputs = _noting_hidden(driver.capture_block_inputs, hidden)
    model, tok = load_float(types.SimpleNamespace(float_dir=bundled_float_dir()))
    model.model.layers = model.model.layers[:args.blocks]
    model.config.num_hidden_layers = args.blocks
    after_load = rss_mib()
    cache = {} if args.cache_dtype is None else {"cache_dtype": args.cache_dtype}
    ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters=args.iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=8, seed=42, progress=False, **cache)
    peaks.stack.append("quantize(), elsewhere")
    ar.quantize()
    peaks.stack.pop()
    time.sleep(3 * peaks.period_s)
    phases = {k: v for k, v in peaks.peaks.items() if k != "outside quantize()"}
    rows = {"after loading the model": after_load, **phases}
    print(f"SmolLM2-135M cut to {args.blocks} blocks, W4G128 sym, iters {args.iters}, nsamples {args.nsamples} x "
          f"{args.seqlen}, batch 8; one copy of the calibration set's hidden states ({hidden['dtype']}): "
          f"{hidden['mib']:.0f} MiB")
    print(f"{'phase':28s} {'peak RSS MiB':>12s}")
    for name, value in rows.items():
        print(f"{name:28s} {value:12.0f}")
    write_json(args.json, {"args": vars(args), "peak_rss_mib": rows, "hidden_copy": hidden})


if __name__ == "__main__":
    main()
