"""GGUF-aware tuning on SmolLM2-135M: perplexity of a GGUF file whose linears were tuned by SignRound on the
file's own grids, against the same format written from the float model by plain round-to-nearest (what
llama.cpp's quantize does), and optionally against SignRound on the matching integer scheme re-rounded to the grid.

Every perplexity is computed on the same token ids (non-overlapping windows of the bundled text) from the weights a
GGUF reader gets back; with ``--llama-site`` the tuned file is also scored by llama.cpp itself. Prints a table and
writes JSON:

    .venv/bin/python benchmarks/interop/gguf_tuning.py --formats q4_k_m --iters 50 \
        --llama-site /tmp/llamavenv/lib/python3.11/site-packages
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/ (bench_io)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from bench_io import write_json  # noqa: E402

from llama_cpp_perplexity import bundled_tokenizer_pre, llama_cpp_perplexity, torch_perplexity  # noqa: E402

from hf_autoround import AutoRoundConfig  # noqa: E402
from hf_autoround.export.gguf import native_scheme  # noqa: E402
from hf_autoround.export.gguf.writer import dequantized_float_model, write_gguf  # noqa: E402
from hf_autoround.models import load_model  # noqa: E402
from hf_autoround.quantize import quantize_model  # noqa: E402


def score(model, tokenizer, path, fmt, pre, windows) -> tuple[float, dict]:
    tensors = write_gguf(model, tokenizer, path, fmt, tokenizer_pre=pre)
    types = {}
    for t in tensors:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    return torch_perplexity(dequantized_float_model(model, tensors), windows), types


def tuned_model(args, fmt, on_grid: bool):
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    scheme = native_scheme(fmt)
    bits = dict(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym) if scheme else {}
    n_layers = model.config.num_hidden_layers
    later = {f"model.layers.{i}.": {"bits": 16} for i in range(args.blocks or n_layers, n_layers)}
    config = AutoRoundConfig(iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                             extra_config=later, **bits)
    start = time.perf_counter()
    quantize_model(model, config, tokenizer=tokenizer, progress=args.progress,
                   gguf_format=f"gguf:{fmt}" if on_grid else None)
    return model, tokenizer, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", default="q4_k_m")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=0, help="tune only the first N blocks (0 = all); the writer "
                   "rounds the rest to the grid, as in the plain file")
    p.add_argument("--compare-integer", action="store_true",
                   help="also tune the integer scheme and let the writer re-round it to the grid")
    p.add_argument("--llama-site", default=None, help="site-packages of a venv with llama-cpp-python")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results", "gguf_tuning.json"))
    args = p.parse_args(argv)
    if args.llama_site:
        sys.path.append(args.llama_site)
    from hf_autoround.eval.perplexity import read_text, token_ids

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    ids = token_ids(tokenizer, read_text(), max_tokens=args.eval_seqlen * args.windows)
    windows = ids[: (ids.numel() // args.eval_seqlen) * args.eval_seqlen].view(-1, args.eval_seqlen)
    pre = bundled_tokenizer_pre(args.model) if args.model == "smollm2-135m" else None
    results = {"settings": vars(args), "tokens": windows.numel(), "float_ppl": torch_perplexity(model, windows),
               "rows": []}
    print(f"float: ppl {results['float_ppl']:.4f} on {windows.numel()} tokens", flush=True)
    tmp = tempfile.mkdtemp(prefix="gguf-tuning-")
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        path = os.path.join(tmp, f"{fmt}.gguf")
        rows = {}
        rows["rtn (writer)"] = (*score(model, tokenizer, path, fmt, pre, windows), 0.0)
        tuned, _, seconds = tuned_model(args, fmt, on_grid=True)
        rows["signround on the grid"] = (*score(tuned, tokenizer, path, fmt, pre, windows), seconds)
        llama = llama_cpp_perplexity(path, windows, args.threads) if args.llama_site else None
        if args.compare_integer and native_scheme(fmt) is not None:
            integer, _, seconds = tuned_model(args, fmt, on_grid=False)
            rows["signround integer, re-rounded"] = (*score(integer, tokenizer, path, fmt, pre, windows), seconds)
        for method, (ppl, types, seconds) in rows.items():
            row = {"format": fmt, "method": method, "ppl": ppl, "gap": ppl - results["float_ppl"],
                   "tune_s": seconds, "types": types}
            if method == "signround on the grid" and llama is not None:
                row["llama_cpp_ppl"] = llama
            results["rows"].append(row)
            extra = f"  llama.cpp {llama:.4f}" if "llama_cpp_ppl" in row else ""
            print(f"{fmt:8s} {method:32s} ppl {ppl:9.4f}  gap {row['gap']:7.4f}  tune {seconds:6.0f} s{extra}",
                  flush=True)
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
