"""What the CPU kernels' activation handling costs in accuracy: perplexity of SmolLM2-135M, W4G128 sym RTN, on Jane
Austen's *Emma* (first N tokens), one quantised model evaluated with each backend in turn.

Backends: ``torch`` (the exact reference: dequantised weight, float32 product), ``cpu_int4`` (activations rounded to
bfloat16 inside torch's op) and ``cpu_w4a8`` (activations quantised to int8 per block of 32). The model runs in
float32, so only the quantised linears differ between rows. ``--emulate 64,128`` adds plain-torch emulations of int8
activations with larger blocks (one scale per 64 / 128 inputs, zero-padded at the end of a row), to show what a
coarser activation grid would cost; ``emulated/32`` doubles as a check of the emulation against ``cpu_w4a8``.
SmolLM2's hidden size 576 is not a multiple of 128: those layers have a partial last group of 64.

Prints a table and writes JSON. Usage:
    python benchmarks/kernel_accuracy.py [--tokens 16384] [--seqlen 2048] [--emulate 32,64,128]
                                         [--json benchmarks/results/kernel_accuracy.json]
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
from hf_autoround.backends import attach_kernels, available_backends  # noqa: E402
from hf_autoround.backends.torch_ref import TorchReferenceKernel  # noqa: E402
from hf_autoround.eval.perplexity import perplexity, read_text, token_ids  # noqa: E402
from hf_autoround.models import load_model  # noqa: E402
from hf_autoround.quant_linear import QuantLinear  # noqa: E402
from hf_autoround.quantize import quantize_model  # noqa: E402

EMMA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "text", "austen_emma.txt")
SCHEME = dict(bits=4, group_size=128, sym=True)
BACKENDS = ["torch", "cpu_int4", "cpu_w4a8"]


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` with its last dimension quantised to int8 per ``block`` inputs (round to nearest even), dequantised."""
    k = x.shape[-1]
    pad = -k % block
    xf = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], (k + pad) // block, block)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv) * (amax / 127.0)
    return q.reshape(*x.shape[:-1], k + pad)[..., :k].to(x.dtype)


class EmulatedW4A8:
    """The reference kernel behind int8 activations with ``block`` inputs per scale."""

    def __init__(self, layer, block: int):
        self.name = f"emulated/{block}"
        self.block = block
        self.ref = TorchReferenceKernel(layer)

    def __call__(self, x):
        return self.ref(int8_blocks(x, self.block))


def use_backend(model, name: str):
    if name.startswith("emulated/"):
        block = int(name.split("/")[1])
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.kernel = EmulatedW4A8(m, block)
    else:
        attach_kernels(model, forced=name, dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--emulate", default="32,64,128", help="activation block sizes to emulate ('' for none)")
    ap.add_argument("--json", default="benchmarks/results/kernel_accuracy.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    ids = token_ids(tok, read_text(EMMA), args.tokens)
    start = time.perf_counter()
    results = {"float": {"ppl": perplexity(model, ids, args.seqlen), "eval_s": time.perf_counter() - start}}
    quantize_model(model, AutoRoundConfig(iters=0, **SCHEME), progress=False)
    names = [b for b in BACKENDS if b in available_backends()]
    names += [f"emulated/{b}" for b in args.emulate.split(",") if b]
    for name in names:
        use_backend(model, name)
        start = time.perf_counter()
        results[name] = {"ppl": perplexity(model, ids, args.seqlen), "eval_s": time.perf_counter() - start}
        print(f"{name}: {results[name]['ppl']:.4f}", flush=True)
    ref = results["torch"]["ppl"]
    print(f"\nSmolLM2-135M W4G128 sym RTN, {ids.numel()} tokens of Emma, seqlen {args.seqlen}, float32 model; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| backend | perplexity | vs torch (exact) | eval s |\n| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        rel = f"{100 * (r['ppl'] / ref - 1):+.3f} %" if name != "float" else "(unquantised)"
        print(f"| {name} | {r['ppl']:.4f} | {rel} | {r.get('eval_s', 0):.0f} |")
    write_json(args.json, {"model": "smollm2-135m", "scheme": SCHEME, "method": "RTN (iters=0)",
                           "tokens": ids.numel(), "seqlen": args.seqlen, "model_dtype": "float32",
                           "torch_threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
