"""Kernel benchmark: per-layer time and effective bandwidth, and end-to-end greedy decode speed.

Part 1 (layers): for each shape (in x out) and batch M, the median time of ``F.linear`` in bfloat16 and float32 and
of our kernels (W4G128 -> cpu_int4, W8G128 -> cpu_int8, W2G64 -> cpu_int4) with bf16 activations. Effective GB/s =
bytes of weight data the kernel reads per call / time; the limit is the machine's memory bandwidth, measured here
with a read over a buffer larger than any cache. Every timing cycles through a pool of copies of the weights
(``--pool-gib``, > 1 GiB by default) so that each call reads its weights from DRAM, not from L3.

Part 2 (decode): tokens/s of greedy decoding with a KV cache (median per-token time after a short prompt) for
SmolLM2-135M and a random 1B-shaped Llama (hidden 2048, 16 layers, intermediate 8192, vocab 32000, untied lm_head):
float32, bfloat16, and our W4G128 / W8G128 / W2G64 quantized models (RTN, kernels attached, bf16 elsewhere); plus
the time of one 128-token prefill.

Prints tables and writes JSON (``--out``). No asserts. Default run: all shapes, M = 1/8/128, both models, a few
minutes. ``--full`` repeats more and decodes more tokens; ``--quick`` is a smoke run.

    .venv/bin/python benchmarks/kernels.py [--quick | --full] [--out benchmarks/results/kernels.json]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from hf_autoround import AutoRoundConfig  # noqa: E402
from hf_autoround.backends import attach_kernels  # noqa: E402
from hf_autoround.qdq import quantize_weight  # noqa: E402
from hf_autoround.quant_linear import QuantLinear  # noqa: E402
from hf_autoround.scheme import QuantScheme  # noqa: E402

SHAPES = [(2048, 2048), (2048, 8192), (4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
BATCHES = [1, 8, 128]
SCHEMES = {"W4G128": QuantScheme(4, 128, True), "W8G128": QuantScheme(8, 128, True), "W2G64": QuantScheme(2, 64, True)}
# (label, scheme, forced backend or None = what "auto" picks)
LAYER_KERNELS = [("W4G128", SCHEMES["W4G128"], None), ("W4G128", SCHEMES["W4G128"], "cpu_w4a8"),
                 ("W8G128", SCHEMES["W8G128"], None), ("W8PC", QuantScheme(8, -1, True), None),
                 ("W2G64", SCHEMES["W2G64"], None)]
DECODE_VARIANTS = [("W4G128", SCHEMES["W4G128"], None), ("W4G128", SCHEMES["W4G128"], "cpu_w4a8"),
                   ("W8G128", SCHEMES["W8G128"], None), ("W2G64", SCHEMES["W2G64"], None)]
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------------------- utils
def median_time(fn, min_reps: int, budget_s: float, best: list | None = None) -> float:
    """Median seconds of ``fn()`` over at least ``min_reps`` calls (more while within ``budget_s``), after a warm-up;
    the fastest call is appended to ``best`` when given (a useful second view when other processes share the CPU)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    if best is not None:
        best.append(min(times))
    return statistics.median(times)


def measure_bandwidth(gib: float = 2.0, reps: int = 5) -> float:
    """DRAM read bandwidth in GB/s: the best of ``reps`` sums over a ``gib`` GiB float32 buffer."""
    buf = torch.ones(int(gib * GIB) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    n = buf.numel() * 4
    del buf
    return n / best / 1e9


def tensor_bytes(obj) -> int:
    """Bytes of all tensors reachable through an object's attributes (kernels keep their derived data there)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif hasattr(o, "__dict__") or hasattr(o, "__slots__"):
            attrs = dict(getattr(o, "__dict__", {}))
            for s in getattr(type(o), "__slots__", ()):
                if hasattr(o, s):
                    attrs[s] = getattr(o, s)
            stack.extend(v for k, v in attrs.items() if k != "layer")
    return total


def clone_kernel(kernel):
    """A copy of a kernel whose derived tensors are new memory (for pools); the layer reference is shared."""
    def clone(o):
        if isinstance(o, torch.Tensor):
            return o.clone()
        if hasattr(o, "__slots__") and not hasattr(o, "__dict__"):
            c = copy.copy(o)
            for s in type(o).__slots__:
                setattr(c, s, clone(getattr(o, s)))
            return c
        return o

    c = copy.copy(kernel)
    for k, v in vars(kernel).items():
        if k != "layer":
            setattr(c, k, clone(v))
    return c


# ---------------------------------------------------------------------------------------------------------- layers
def make_quant_layer(in_f, out_f, scheme, seed=0, forced=None):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    layer = QuantLinear.from_quantized(quantize_weight(w, scheme), "auto_round:auto_gptq")
    attach_kernels(layer, forced=forced, dtype=torch.bfloat16)
    return layer


def _dense_pool(in_f, out_f, dtype, pool_gib):
    w = (torch.randn(out_f, in_f) * 0.02).to(dtype)
    n = max(2, int(pool_gib * GIB // (w.numel() * w.element_size())) + 1)
    pool = [w] + [w.clone() for _ in range(n - 1)]
    return [lambda x, w=w_: F.linear(x, w) for w_ in pool], w.numel() * w.element_size()


def _kernel_pool(in_f, out_f, scheme, forced, pool_gib):
    layer = make_quant_layer(in_f, out_f, scheme, forced=forced)
    kernel = layer.kernel
    nbytes = tensor_bytes(kernel)
    n = max(2, int(pool_gib * GIB // nbytes) + 1)
    return [kernel] + [clone_kernel(kernel) for _ in range(n - 1)], nbytes, kernel.name


def bench_layers(shapes, batches, pool_gib, min_reps, budget_s, log):
    """One pool at a time (built, timed at every batch size, freed), so memory stays near ``pool_gib``."""
    rows = []
    for in_f, out_f in shapes:
        candidates = [("bf16 F.linear", torch.bfloat16, None, None), ("fp32 F.linear", torch.float32, None, None)]
        candidates += [(label, torch.bfloat16, scheme, forced) for label, scheme, forced in LAYER_KERNELS]
        for label, dt, scheme, forced in candidates:
            if scheme is None:
                fns, nbytes = _dense_pool(in_f, out_f, dt, pool_gib)
                name = label
            else:
                fns, nbytes, backend = _kernel_pool(in_f, out_f, scheme, forced, pool_gib)
                name = f"{label} {backend}"
            for m in batches:
                x = torch.randn(m, in_f).to(dt)
                state = {"i": 0}

                def call():
                    fn = fns[state["i"] % len(fns)]
                    state["i"] += 1
                    fn(x)

                fastest = []
                t = median_time(call, min_reps if m < 64 else max(3, min_reps // 2), budget_s, fastest)
                row = dict(shape=f"{in_f}x{out_f}", in_features=in_f, out_features=out_f, batch=m, kernel=name,
                           us=t * 1e6, best_us=fastest[0] * 1e6, weight_bytes=nbytes, gbps=nbytes / t / 1e9,
                           best_gbps=nbytes / fastest[0] / 1e9, pool=len(fns))
                rows.append(row)
                log(f"  {row['shape']:>11} M={m:<4} {name:<22} {row['us']:>11.0f} us {row['gbps']:6.1f} GB/s")
            del fns
            gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------------------- decode
def llama_1b(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


@torch.no_grad()
def decode_speed(model, n_tokens, prompt_len=8, prefill_len=128, vocab=None):
    """(median seconds per decoded token, seconds of one prefill of ``prefill_len`` tokens)."""
    from transformers import DynamicCache

    vocab = vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    cache = DynamicCache()
    out = model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(n_tokens):
        t = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    long_ids = torch.randint(0, vocab, (1, prefill_len), generator=gen)
    model(long_ids, use_cache=False)  # warm-up
    t = time.perf_counter()
    model(long_ids, use_cache=False)
    prefill = time.perf_counter() - t
    times = times[1:] if len(times) > 2 else times
    return statistics.median(times), prefill, min(times)


def quantized_copy(model, scheme: QuantScheme, forced=None):
    from hf_autoround.quantize import quantize_model

    q = copy.deepcopy(model)
    quantize_model(q, AutoRoundConfig(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym, iters=0),
                   progress=False)
    attach_kernels(q, forced=forced, dtype=torch.bfloat16)
    return q


def bench_decode(models, n_tokens, log):
    rows = []
    for model_name in models:
        if model_name == "smollm2-135m":
            from hf_autoround.models import load_model

            model, _ = load_model("smollm2-135m", dtype=torch.float32)
        else:
            model = llama_1b(torch.float32)
        variants = [("float32", None, None), ("bf16", None, None)] + DECODE_VARIANTS
        for variant, scheme, forced in variants:
            if variant == "bf16":
                model = model.to(torch.bfloat16)
            m = quantized_copy(model, scheme, forced) if scheme is not None else model
            backends = sorted({mod.kernel.name for mod in m.modules() if isinstance(mod, QuantLinear)})
            per_token, prefill, fastest = decode_speed(m, n_tokens)
            if forced:
                variant = f"{variant}/{forced}"
            row = dict(model=model_name, variant=variant, backends=backends, ms_per_token=per_token * 1e3,
                       tokens_per_s=1 / per_token, prefill128_ms=prefill * 1e3,
                       best_ms_per_token=fastest * 1e3)
            rows.append(row)
            log(f"  {model_name:<13} {variant:<16} {row['ms_per_token']:8.1f} ms/token {row['tokens_per_s']:7.1f} tok/s "
                f" prefill(128) {row['prefill128_ms']:8.0f} ms  {','.join(backends)}")
            if m is not model:
                del m
                gc.collect()
        del model
        gc.collect()
    for model_name in models:
        base = next(r for r in rows if r["model"] == model_name and r["variant"] == "bf16")
        for r in rows:
            if r["model"] == model_name:
                r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["prefill_speedup_vs_bf16"] = base["prefill128_ms"] / r["prefill128_ms"]
    return rows


# ------------------------------------------------------------------------------------------------------------ main
def print_layer_table(rows, bandwidth, log):
    log(f"\nPer layer: median us / effective GB/s / % of the {bandwidth:.1f} GB/s measured DRAM bandwidth "
        "(bytes = weight data the kernel reads)")
    _layer_grid(rows, bandwidth, log, "us", "gbps")
    log("\nSame, fastest call instead of the median (us / GB/s / % of bandwidth)")
    _layer_grid(rows, bandwidth, log, "best_us", "best_gbps")


def _layer_grid(rows, bandwidth, log, us_key, gbps_key):
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    log("| shape (in x out) | M | " + " | ".join(kernels) + " |")
    log("|---|---|" + "---|" * len(kernels))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for m in dict.fromkeys(r["batch"] for r in rows):
            cells = []
            for k in kernels:
                r = next((r for r in rows if r["shape"] == shape and r["batch"] == m and r["kernel"] == k), None)
                cells.append(f"{r[us_key]:.0f} / {r[gbps_key]:.1f} / {100 * r[gbps_key] / bandwidth:.0f}%"
                             if r else "")
            log(f"| {shape} | {m} | " + " | ".join(cells) + " |")


def print_decode_table(rows, log):
    log("\nGreedy decode, batch 1 (median ms/token; tokens/s; ratio to bf16) and one 128-token prefill")
    log("| model | variant | backend | ms/token | tokens/s | x bf16 | prefill 128 ms | prefill x bf16 | fastest ms/token |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r['model']} | {r['variant']} | {','.join(r['backends']) or '-'} | {r['ms_per_token']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['speedup_vs_bf16']:.2f} | {r['prefill128_ms']:.0f} | "
            f"{r['prefill_speedup_vs_bf16']:.2f} | {r['best_ms_per_token']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: two shapes, small pools, few tokens")
    p.add_argument("--full", action="store_true", help="more repetitions and tokens")
    p.add_argument("--pool-gib", type=float, default=None, help="weight pool size per kernel (default 1.25)")
    p.add_argument("--tokens", type=int, default=None, help="decoded tokens per model variant")
    p.add_argument("--models", default="smollm2-135m,llama-1b")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = p.parse_args(argv)

    shapes, batches = SHAPES, BATCHES
    pool_gib, min_reps, budget, tokens = 1.25, 5, 1.0, 24
    if args.quick:
        shapes, pool_gib, min_reps, budget, tokens = SHAPES[:2], 0.25, 3, 0.2, 6
    if args.full:
        min_reps, budget, tokens = 15, 4.0, 64
    pool_gib = args.pool_gib if args.pool_gib is not None else pool_gib
    tokens = args.tokens or tokens

    def log(msg):
        print(msg, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)

    info = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), machine=platform.processor() or
                platform.machine(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    log(f"torch {info['torch']}, {info['threads']} threads, {info['cpu_capability']}")
    bandwidth = measure_bandwidth()
    log(f"measured DRAM read bandwidth: {bandwidth:.1f} GB/s")
    info["loadavg_start"] = os.getloadavg()
    log(f"load average at start: {info['loadavg_start']} (other processes share these cores)")
    result = dict(info=info, bandwidth_gbps=bandwidth, layers=[], decode=[])
    if not args.skip_layers:
        log(f"\nlayers (pool {pool_gib} GiB per kernel)")
        result["layers"] = bench_layers(shapes, batches, pool_gib, min_reps, budget, log)
        print_layer_table(result["layers"], bandwidth, log)
    if not args.skip_decode:
        log("\ndecode")
        result["decode"] = bench_decode([m for m in args.models.split(",") if m], tokens, log)
        print_decode_table(result["decode"], log)
    info["loadavg_end"] = os.getloadavg()
    log(f"load average at end: {info['loadavg_end']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
