"""Kernel benchmark: per-layer time and effective bandwidth, and end-to-end greedy decode speed.

Part 1 (layers): for each shape (in x out) and batch M, the median time of ``F.linear`` in bfloat16 and float32 and
of our kernels (W4G128 on cpu_w4a8 and on cpu_int4, W8G128 / W8 per channel and W2G64 on what "auto" picks) with
bf16 activations. Effective GB/s = bytes of weight data the kernel reads per call / time; the limit is the
machine's memory bandwidth, measured here with a read over a buffer larger than any cache. Every kernel cycles
through a pool of copies of its weights (``--pool-gib`` each) so that each call reads its weights from DRAM.

Part 2 (decode): tokens/s of greedy decoding with a KV cache (median per-token time after a short prompt) for
SmolLM2-135M and a random 1B-shaped Llama (hidden 2048, 16 layers, intermediate 8192, vocab 32000, untied lm_head):
float32, bfloat16, and our W4G128 (cpu_w4a8 and cpu_int4) / W8G128 / W2G64 quantized models (RTN, kernels attached,
bf16 elsewhere); plus the time of one 128-token prefill. ``--breakdown`` adds two W4G128 rows with the quantised
linears (and then also the lm_head) replaced by stubs returning zeros: what the rest of the model costs per token.

Both parts interleave: all kernels (all model variants) are built first, then timed in rounds, each round giving
every candidate its turn, so that a load change on a shared machine hits all of them alike.

Prints tables and writes JSON (``--out``). No asserts. Default run: all shapes, M = 1/8/128, both models, a few
minutes. ``--full`` repeats more and decodes more tokens; ``--quick`` is a smoke run.

    .venv/bin/python benchmarks/kernels.py [--quick | --full] [--breakdown] [--out benchmarks/results/kernels.json]
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench_io import write_json

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from hf_autoround import AutoRoundConfig  # noqa: E402
from hf_autoround.backends import attach_kernels, native  # noqa: E402
from hf_autoround.qdq import quantize_weight  # noqa: E402
from hf_autoround.quant_linear import QuantLinear  # noqa: E402
from hf_autoround.scheme import QuantScheme  # noqa: E402

SHAPES = [(2048, 2048), (2048, 8192), (4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
BATCHES = [1, 8, 128]
SCHEMES = {"W4G128": QuantScheme(4, 128, True), "W8G128": QuantScheme(8, 128, True), "W2G64": QuantScheme(2, 64, True)}
# (label, scheme, forced backend or None = what "auto" picks)
LAYER_KERNELS = [("W4G128", SCHEMES["W4G128"], "cpu_w4a8"), ("W4G128", SCHEMES["W4G128"], "cpu_int4"),
                 ("W8G128", SCHEMES["W8G128"], None), ("W8PC", QuantScheme(8, -1, True), None),
                 ("W2G64", SCHEMES["W2G64"], None)]
# (label, scheme, kernels to measure on one quantised copy: forced backend names, None = what "auto" picks)
DECODE_VARIANTS = [("W4G128", SCHEMES["W4G128"], ["cpu_w4a8", "cpu_int4"]), ("W8G128", SCHEMES["W8G128"], [None]),
                   ("W2G64", SCHEMES["W2G64"], [None])]
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------------------- utils
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


def _kernel_pool(in_f, out_f, scheme, forced, pool_gib, build=None):
    layer = make_quant_layer(in_f, out_f, scheme, forced=forced)
    kernel = layer.kernel
    if build is not None:  # another instruction-set build of our native kernel
        kernel.lib = native.load_variant(build)
    nbytes = tensor_bytes(kernel)
    n = max(2, int(pool_gib * GIB // nbytes) + 1)
    return [kernel] + [clone_kernel(kernel) for _ in range(n - 1)], nbytes, kernel.name


def layer_candidates(in_f, out_f, pool_gib):
    """[(name, activation dtype, pool of callables, weight bytes per call)] for one shape."""
    out = []
    for label, dt in (("bf16 F.linear", torch.bfloat16), ("fp32 F.linear", torch.float32)):
        fns, nbytes = _dense_pool(in_f, out_f, dt, pool_gib)
        out.append((label, dt, fns, nbytes))
    for label, scheme, forced in LAYER_KERNELS:
        fns, nbytes, backend = _kernel_pool(in_f, out_f, scheme, forced, pool_gib)
        out.append((f"{label} {backend}", torch.bfloat16, fns, nbytes))
    if native.available() and native.instruction_set() != "avx2":  # what the VNNI build gains, side by side
        fns, nbytes, backend = _kernel_pool(in_f, out_f, SCHEMES["W4G128"], "cpu_w4a8", pool_gib, build="avx2")
        out.append((f"W4G128 {backend} (avx2 build)", torch.bfloat16, fns, nbytes))
    return out


def _time_pool(fns, x, times):
    for fn in fns:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)


def bench_layers(shapes, batches, pool_gib, rounds, log):
    """Per shape, every kernel's pool is built, then timed in interleaved rounds (each round calls every copy in
    every kernel's pool once, kernel after kernel), so that all kernels see the same machine load; the pools of one
    round together exceed ``pool_gib`` x kernels, far beyond any cache. Medians and minima over all calls."""
    rows = []
    for in_f, out_f in shapes:
        candidates = layer_candidates(in_f, out_f, pool_gib)
        for m in batches:
            times = {name: [] for name, *_ in candidates}
            xs = {dt: torch.randn(m, in_f).to(dt) for dt in (torch.bfloat16, torch.float32)}
            for name, dt, fns, _ in candidates:
                fns[0](xs[dt])  # warm-up (first-call set-up)
            for _ in range(rounds if m < 64 else max(2, rounds // 2)):
                for name, dt, fns, _ in candidates:
                    _time_pool(fns, xs[dt], times[name])
            for name, dt, fns, nbytes in candidates:
                t, best = statistics.median(times[name]), min(times[name])
                row = dict(shape=f"{in_f}x{out_f}", in_features=in_f, out_features=out_f, batch=m, kernel=name,
                           us=t * 1e6, best_us=best * 1e6, weight_bytes=nbytes, gbps=nbytes / t / 1e9,
                           best_gbps=nbytes / best / 1e9, pool=len(fns), calls=len(times[name]),
                           load=os.getloadavg()[0])
                rows.append(row)
                log(f"  {row['shape']:>11} M={m:<4} {name:<22} {row['us']:>11.0f} us {row['gbps']:6.1f} GB/s "
                    f"(load {row['load']:.2f})")
        del candidates
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


def quantized_copy(model, scheme: QuantScheme, forced=None):
    from hf_autoround.quantize import quantize_model

    q = copy.deepcopy(model)
    quantize_model(q, AutoRoundConfig(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym, iters=0),
                   progress=False)
    attach_kernels(q, forced=forced, dtype=torch.bfloat16)
    return q


class _Stub:
    """Stands in for a kernel or the lm_head: returns zeros of the right shape at (almost) no cost."""

    name = "stub"

    def __init__(self, out_features):
        self.out_features = out_features

    def __call__(self, x):
        return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)


class DecodeVariant:
    """One row of the decode table: a model, the kernels its QuantLinears use (models are shared between rows
    that differ only in kernels), optionally stubbed parts, and its own KV cache and token stream."""

    def __init__(self, label, model, kernels=None, stub_head=False, measure_prefill=True):
        self.label, self.model, self.kernels, self.stub_head = label, model, kernels, stub_head
        self.measure_prefill = measure_prefill
        self.times, self.cache, self.next = [], None, None

    def apply(self):
        if self.kernels is not None:
            for module, kernel in self.kernels.items():
                module.kernel = kernel
        head = self.model.get_output_embeddings()
        if self.stub_head:
            head.forward = _Stub(head.out_features)
        elif "forward" in vars(head):
            del head.forward

    def backends(self):
        return sorted({k.name for k in self.kernels.values()}) if self.kernels else []

    @torch.no_grad()
    def start(self, prompt):
        from transformers import DynamicCache

        self.apply()
        self.cache = DynamicCache()
        out = self.model(prompt, past_key_values=self.cache, use_cache=True)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self, n):
        self.apply()
        for _ in range(n):
            t = time.perf_counter()
            out = self.model(self.next, past_key_values=self.cache, use_cache=True)
            self.next = out.logits[:, -1:].argmax(-1)
            self.times.append(time.perf_counter() - t)

    @torch.no_grad()
    def prefill(self, ids):
        self.apply()
        self.model(ids, use_cache=False)  # warm-up
        t = time.perf_counter()
        self.model(ids, use_cache=False)
        return time.perf_counter() - t


def _kernel_map(model):
    return {m: m.kernel for m in model.modules() if isinstance(m, QuantLinear)}


def decode_variants(model_name, breakdown):
    """The rows measured for one model: float32, bf16, and the quantised schemes (W4G128 once per kernel)."""
    if model_name == "smollm2-135m":
        from hf_autoround.models import load_model

        fp32, _ = load_model("smollm2-135m", dtype=torch.float32)
    else:
        fp32 = llama_1b(torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    variants = [DecodeVariant("float32", fp32), DecodeVariant("bf16", bf16)]
    for label, scheme, forced_list in DECODE_VARIANTS:
        q = quantized_copy(bf16, scheme)
        for forced in forced_list:
            attach_kernels(q, forced=forced, dtype=torch.bfloat16)
            variants.append(DecodeVariant(f"{label}/{forced}" if forced else label, q, _kernel_map(q)))
        if breakdown and label == "W4G128":
            auto = variants[-len(forced_list)].kernels  # the first kernel set: all it needs is the layers
            stubs = {m: _Stub(m.out_features) for m in auto}
            variants.append(DecodeVariant(f"{label} linears stubbed", q, stubs, measure_prefill=False))
            variants.append(DecodeVariant(f"{label} linears+head stubbed", q, stubs, stub_head=True,
                                          measure_prefill=False))
        gc.collect()
    return variants


def bench_decode(models, n_tokens, rounds, log, breakdown=False, prompt_len=8, prefill_len=128):
    """Greedy decode with a KV cache, batch 1: every variant decodes ``n_tokens`` tokens, in ``rounds``
    interleaved rounds (each round: a few tokens of every variant in turn, so that all see the same load); median
    per-token time over all tokens but each variant's first. Then one ``prefill_len``-token prefill per variant."""
    rows = []
    for model_name in models:
        variants = decode_variants(model_name, breakdown)
        vocab = variants[0].model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
        long_ids = torch.randint(0, vocab, (1, prefill_len), generator=gen)
        for v in variants:
            v.start(prompt)
        per_round = max(1, -(-n_tokens // rounds))
        for _ in range(rounds):
            for v in variants:
                v.step(per_round)
            log(f"  round done, load {os.getloadavg()[0]:.2f}")
        for v in variants:
            times = v.times[1:]
            prefill = v.prefill(long_ids) if v.measure_prefill else None
            row = dict(model=model_name, variant=v.label, backends=v.backends(),
                       ms_per_token=statistics.median(times) * 1e3, tokens_per_s=1 / statistics.median(times),
                       best_ms_per_token=min(times) * 1e3, tokens=len(times),
                       prefill128_ms=prefill * 1e3 if prefill is not None else None)
            rows.append(row)
            prefill_text = f"{row['prefill128_ms']:8.0f} ms" if prefill is not None else "       - ms"
            log(f"  {model_name:<13} {v.label:<28} {row['ms_per_token']:8.1f} ms/token {row['tokens_per_s']:7.1f} "
                f"tok/s  prefill({prefill_len}) {prefill_text}  {','.join(row['backends'])}")
        del variants
        gc.collect()
    for model_name in models:
        base = next(r for r in rows if r["model"] == model_name and r["variant"] == "bf16")
        for r in rows:
            if r["model"] == model_name:
                r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["prefill_speedup_vs_bf16"] = (base["prefill128_ms"] / r["prefill128_ms"]
                                                if r["prefill128_ms"] else None)
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
        prefill = (f"{r['prefill128_ms']:.0f} | {r['prefill_speedup_vs_bf16']:.2f}" if r["prefill128_ms"] else "- | -")
        log(f"| {r['model']} | {r['variant']} | {','.join(r['backends']) or '-'} | {r['ms_per_token']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['speedup_vs_bf16']:.2f} | {prefill} | {r['best_ms_per_token']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: two shapes, small pools, few tokens")
    p.add_argument("--full", action="store_true", help="more repetitions and tokens")
    p.add_argument("--pool-gib", type=float, default=None, help="weight pool size per kernel (default 0.5)")
    p.add_argument("--tokens", type=int, default=None, help="decoded tokens per model variant")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6)")
    p.add_argument("--breakdown", action="store_true", help="add W4G128 decode rows with stubbed linears / lm_head")
    p.add_argument("--models", default="smollm2-135m,llama-1b")
    p.add_argument("--shapes", default=None, help="layer shapes IN x OUT, comma-separated (default: all five)")
    p.add_argument("--batches", default=None, help="layer batch sizes, comma-separated (default 1,8,128)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = p.parse_args(argv)

    shapes, batches = SHAPES, BATCHES
    pool_gib, rounds, tokens = 0.5, 6, 24
    if args.quick:
        shapes, pool_gib, rounds, tokens = SHAPES[:2], 0.1, 2, 6
    if args.full:
        rounds, tokens = 12, 64
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes.split(",")]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    pool_gib = args.pool_gib if args.pool_gib is not None else pool_gib
    tokens = args.tokens or tokens
    rounds = args.rounds or rounds

    def log(msg):
        print(msg, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)

    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), command=" ".join(sys.argv),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                native_build=native.instruction_set() if native.available() else "unavailable",
                machine=platform.processor() or platform.machine(),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    log(f"torch {info['torch']}, {info['threads']} threads, {info['cpu_capability']}, "
        f"cpu_w4a8 build {info['native_build']}")
    bandwidth = measure_bandwidth()
    log(f"measured DRAM read bandwidth: {bandwidth:.1f} GB/s")
    info["loadavg_start"] = os.getloadavg()
    log(f"load average at start: {info['loadavg_start']} (other processes share these cores)")
    result = dict(info=info, bandwidth_gbps=bandwidth, layers=[], decode=[])
    if not args.skip_layers:
        log(f"\nlayers (pool {pool_gib} GiB per kernel, {rounds} interleaved rounds)")
        result["layers"] = bench_layers(shapes, batches, pool_gib, rounds, log)
        print_layer_table(result["layers"], bandwidth, log)
    if not args.skip_decode:
        log(f"\ndecode ({tokens} tokens per variant in {rounds} interleaved rounds)")
        result["decode"] = bench_decode([m for m in args.models.split(",") if m], tokens, rounds, log,
                                        breakdown=args.breakdown)
        print_decode_table(result["decode"], log)
    info["loadavg_end"] = os.getloadavg()
    log(f"load average at end: {info['loadavg_end']}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
