"""Does SignRound over-fit its calibration samples? The block loss on samples its steps never drew, by iters.

    .venv/bin/python benchmarks/heldout_loss.py                    # blocks 0-3, W4G128 sym, iters 50,200, seeds 42,7,1
    .venv/bin/python benchmarks/heldout_loss.py --iters 50,200 --seeds 42 --blocks 2

The calibration set is ``2 x nsamples`` samples of ``seqlen`` tokens (the first half is the set ``tuning.py``
uses). In every block the SignRound steps draw their batches from the first half only; the parameters they keep,
and the starting ones, are then scored with the relative block loss (``block_loss``, float32 products) on both
halves: the training half and the held-out half. What comes before the steps (channel scaling, the
optimised-RTN start) and the outputs handed to the next block still use both halves. The perplexity of the model
(the first ``--blocks`` blocks quantised, the rest float) is printed too. Prints a table and writes JSON; asserts
nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import types

import torch

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)


def scored(block, layers, params, inputs, hidden, targets, indices, batch: int) -> float:
    """Mean relative block loss of ``params`` over the samples ``indices``."""
    from hf_autoround.tuning.block_loss import block_loss
    from hf_autoround.tuning.cache import forward_block
    from hf_autoround.tuning.signround import wrapped

    total = 0.0
    with wrapped(block, layers, params), torch.no_grad():
        for idx in indices.split(batch):
            pred = forward_block(block, inputs, hidden, idx, torch.float32)
            mask = None if inputs.token_mask is None else inputs.token_mask.index_select(0, idx)
            total += float(block_loss(pred, targets.index_select(0, idx), mask, "relative")) * len(idx)
    return total / len(indices)


def tune_on_first_half(tune_block, log: list):
    """``driver.tune_block``, its steps restricted to the first half of the samples, scored on both halves."""
    def wrapper(block, layers, inputs, hidden, targets, settings, init=None):
        half = inputs.nsamples // 2
        train, held = torch.arange(half), torch.arange(half, 2 * half)
        start = {n: p.clone() for n, p in init.items()}  # the optimised-RTN start (on by default)
        result = tune_block(block, layers, inputs.select(train), hidden[:half], targets[:half], settings, init)
        row = {"best_iter": result.best_iter}
        for label, params in (("start", start), ("kept", result.params)):
            for part, indices in (("train", train), ("heldout", held)):
                row[f"{label}_{part}"] = scored(block, layers, params, inputs, hidden, targets, indices,
                                                settings.batch_size)
        log.append(row)
        return result
    return wrapper


def run(args, iters: int, seed: int) -> dict:
    from hf_autoround import AutoRound
    from hf_autoround.models import bundled_float_dir
    from hf_autoround.tuning import driver, get_calibration_data
    from tuning import eval_ppl, float_layers, load_float

    bench = types.SimpleNamespace(float_dir=bundled_float_dir(), blocks=args.blocks, eval_tokens=args.eval_tokens,
                                  eval_seqlen=args.eval_seqlen)
    model, tok = load_float(bench)
    calib = list(get_calibration_data(None, tok, args.seqlen, 2 * args.nsamples, 42).input_ids)
    log: list = []
    original = driver.tune_block
    driver.tune_block = tune_on_first_half(original, log)
    try:
        ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters=iters, nsamples=2 * args.nsamples,
                       seqlen=args.seqlen, batch_size=8, dataset=calib, seed=seed, progress=False,
                       layer_config=float_layers(bench, model))
        ar.quantize()
    finally:
        driver.tune_block = original
    return {"iters": iters, "seed": seed, "blocks": log, "ppl": eval_ppl(model, tok, bench)}


def print_table(runs: list[dict]) -> None:
    keys = ("start_train", "kept_train", "start_heldout", "kept_heldout")
    print(f"{'iters':>5s} {'seed':>4s} {'block':>5s} " + " ".join(f"{k:>13s}" for k in keys) + f" {'best_iter':>9s}")
    for r in runs:
        for i, b in enumerate(r["blocks"]):
            print(f"{r['iters']:5d} {r['seed']:4d} {i:5d} " + " ".join(f"{b[k]:13.5g}" for k in keys)
                  + f" {b['best_iter']:9d}")
        print(f"{r['iters']:5d} {r['seed']:4d} {'ppl':>5s} {r['ppl']:13.3f}")
    print("\nmean over seeds and blocks, and mean perplexity:")
    for iters in sorted({r["iters"] for r in runs}):
        rows = [b for r in runs if r["iters"] == iters for b in r["blocks"]]
        ppl = statistics.mean(r["ppl"] for r in runs if r["iters"] == iters)
        print(f"iters {iters:4d}: " + ", ".join(f"{k} {statistics.mean(b[k] for b in rows):.5g}" for k in keys)
              + f"; ppl {ppl:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--iters", default="50,200")
    p.add_argument("--seeds", default="42,7,1")
    p.add_argument("--nsamples", type=int, default=64, help="samples the steps draw from (as many more are held out)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "heldout_loss.json"))
    args = p.parse_args()
    runs = []
    for iters in [int(i) for i in args.iters.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            runs.append(run(args, iters, seed))
            print(f"iters {iters} seed {seed}: ppl {runs[-1]['ppl']:.3f}", flush=True)
    print(f"\nSmolLM2-135M blocks 0-{args.blocks - 1} W4G128 sym (the rest float), steps on {args.nsamples} samples, "
          f"{args.nsamples} held out, seqlen {args.seqlen}, batch 8; relative block loss, mean over samples")
    print_table(runs)
    write_json(args.json, {"args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
