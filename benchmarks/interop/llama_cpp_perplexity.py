"""llama.cpp as a consumer of our GGUF files: perplexity of SmolLM2-135M in llama.cpp vs our in-memory model.

For each GGUF format: quantise the float model to that format's grid, write the file, and compute perplexity on
the same token ids (non-overlapping windows) twice — with llama.cpp (PyPI ``llama-cpp-python``, which runs
llama.cpp's own kernels) and with the in-memory model whose weights are exactly the GGUF's dequantised weights.
Both see identical token ids (tokenised once, by the HF tokenizer), so only the model differs. Prints a table and
writes JSON. No asserts: the issue's target is a difference within 2 %.

Run it with the project's python; ``--llama-site`` points at the site-packages of a venv with llama-cpp-python
(built from source, see benchmarks/interop/README.md):

    .venv/bin/python benchmarks/interop/llama_cpp_perplexity.py --formats q4_k_m,q4_0,q8_0 \
        --llama-site /tmp/llamavenv/lib/python3.11/site-packages
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ (bench_io)
from bench_io import write_json  # noqa: E402


def llama_cpp_perplexity(path: str, windows: torch.Tensor, threads: int) -> float:
    from llama_cpp import Llama

    seqlen = windows.shape[1]
    llm = Llama(model_path=path, n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    nll, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = torch.from_numpy(np.array(llm.scores[: seqlen - 1], dtype=np.float32))
        target = torch.tensor(row[1:])
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += seqlen - 1
    llm.close() if hasattr(llm, "close") else None
    return math.exp(nll / count)


def torch_perplexity(model, windows: torch.Tensor) -> float:
    from hf_autoround.eval.perplexity import perplexity

    return perplexity(model, windows.reshape(-1), seqlen=windows.shape[1])


def bundled_tokenizer_pre(name: str) -> str | None:
    """The pre-tokenizer name llama.cpp uses for the bundled model (read from the GGUF it ships as)."""
    import gguf

    from hf_autoround.models import bundled_gguf_path

    field = gguf.GGUFReader(bundled_gguf_path(name)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="q4_k_m,q4_0,q8_0")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="number of seqlen windows of the bundled text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-site", default=os.environ.get("LLAMA_CPP_SITE"),
                        help="site-packages of a venv with llama-cpp-python (appended to sys.path)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "llama_cpp_perplexity.json"))
    parser.add_argument("--keep", default=None, help="folder to keep the GGUF files in")
    args = parser.parse_args(argv)
    if args.llama_site:
        sys.path.append(args.llama_site)
    import llama_cpp  # noqa: F401  (fail early when it is missing)

    from hf_autoround.eval.perplexity import read_text, token_ids
    from hf_autoround.export.gguf.writer import dequantized_float_model, write_gguf
    from hf_autoround.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    ids = token_ids(tokenizer, read_text(), max_tokens=args.seqlen * args.windows)
    windows = ids[: (ids.numel() // args.seqlen) * args.seqlen].view(-1, args.seqlen)
    pre = bundled_tokenizer_pre(args.model) if args.model == "smollm2-135m" else None
    results = {"model": args.model, "seqlen": args.seqlen, "windows": windows.shape[0],
               "tokens": windows.numel(), "llama_cpp_python": llama_cpp.__version__, "rows": []}
    t0 = time.perf_counter()
    results["float_torch_ppl"] = torch_perplexity(model, windows)
    print(f"float model (torch): ppl {results['float_torch_ppl']:.4f}  ({time.perf_counter() - t0:.0f} s)")
    folder = args.keep or tempfile.mkdtemp(prefix="gguf-ppl-")
    os.makedirs(folder, exist_ok=True)
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        path = os.path.join(folder, f"{args.model}-{fmt}.gguf")
        t0 = time.perf_counter()
        torch.set_num_threads(1)  # many small elementwise ops: extra threads only contend on a shared machine
        tensors = write_gguf(model, tokenizer, path, fmt, tokenizer_pre=pre)
        torch.set_num_threads(args.threads)
        write_s = time.perf_counter() - t0
        ours = torch_perplexity(dequantized_float_model(model, tensors), windows)
        t0 = time.perf_counter()
        theirs = llama_cpp_perplexity(path, windows, args.threads)
        types = {}
        for t in tensors:
            types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
        row = {"format": fmt, "ours_ppl": ours, "llama_cpp_ppl": theirs, "rel_diff": theirs / ours - 1,
               "file_mb": os.path.getsize(path) / 2**20, "write_s": write_s,
               "llama_cpp_s": time.perf_counter() - t0, "tensor_types": types}
        results["rows"].append(row)
        print(f"{fmt:8s} ours {ours:9.4f}  llama.cpp {theirs:9.4f}  diff {100 * row['rel_diff']:+6.2f} %  "
              f"file {row['file_mb']:6.1f} MiB  types {types}", flush=True)
        if not args.keep:
            os.remove(path)
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
