"""Float vs round-to-nearest perplexity of SmolLM2-135M on Jane Austen's *Emma* (first N tokens).

Prints a table and writes JSON. Usage: python benchmarks/rtn_quality.py [--tokens 16384] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench_io import write_json

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_autoround import AutoRoundConfig  # noqa: E402
from hf_autoround.eval.perplexity import perplexity, read_text, token_ids  # noqa: E402
from hf_autoround.models import load_model  # noqa: E402
from hf_autoround.quantize import quantize_model  # noqa: E402

EMMA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "text", "austen_emma.txt")
SCHEMES = {
    "W4G128 sym": dict(bits=4, group_size=128, sym=True),
    "W3G128 sym": dict(bits=3, group_size=128, sym=True),
    "W2G64 asym": dict(bits=2, group_size=64, sym=False),
    "W8 per-channel sym": dict(bits=8, group_size=-1, sym=True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--json", default="benchmarks/results/rtn_quality.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    ids = token_ids(tok, read_text(EMMA), args.tokens)
    results = {"float": {"ppl": perplexity(model, ids, args.seqlen)}}
    for name, scheme in SCHEMES.items():
        model, _ = load_model("smollm2-135m")
        start = time.perf_counter()
        quantize_model(model, AutoRoundConfig(iters=0, **scheme), progress=False)
        seconds = time.perf_counter() - start
        results[name] = {"ppl": perplexity(model, ids, args.seqlen), "quantize_s": seconds}
    base = results["float"]["ppl"]
    print(f"SmolLM2-135M, {ids.numel()} tokens of Emma, seqlen {args.seqlen}, RTN (iters=0)")
    print(f"| scheme | perplexity | vs float | quantize s |\n| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['ppl']:.3f} | {r['ppl'] / base:.3f}x | {r.get('quantize_s', 0):.1f} |")
    write_json(args.json, {"tokens": ids.numel(), "seqlen": args.seqlen, "results": results})


if __name__ == "__main__":
    main()
