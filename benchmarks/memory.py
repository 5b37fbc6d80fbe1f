"""Peak host memory of tuning against model depth: the normal mode and ``low_cpu_mem_usage=True``.

    .venv/bin/python benchmarks/memory.py                        # 8, 16 and 32 layers, both modes
    .venv/bin/python benchmarks/memory.py --layers 4 8 --iters 1  # quicker

Models: random Llamas (hidden 1024, intermediate 2816, 16 heads, vocab 32000, float32), written once to a temporary
folder as safetensors. Each run is a fresh subprocess that loads the model (normal: ``from_pretrained``; low-memory:
the blocks stay in the files), tunes it (W4G128, small settings) and saves the native checkpoint with
``AutoRound.quantize_and_save``. Its peak RSS is ``ru_maxrss``; on Linux that number starts from the RSS of the
process that spawned it (exec keeps the old address space's high-water mark), so this driver never imports torch and
builds the models in subprocesses too; ``VmHWM`` (the new address space's own high-water mark) is recorded beside it
as a check. ``after imports`` is the worker's RSS before it touches the model (torch, transformers and this
package), the floor under every number. Prints a table and writes JSON (default
``benchmarks/results/memory.json``); asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
             vocab_size=32000, max_position_embeddings=512)


def rss_mb() -> float:
    """Peak RSS of this process so far (``ru_maxrss``), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float | None:
    """``VmHWM`` of /proc/self/status (Linux), MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def build_model(path: str, layers: int) -> None:
    """A random Llama written to ``path`` (in a subprocess of its own: see the module doc)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, dtype="float32", **SHAPE)
    LlamaForCausalLM(config).save_pretrained(path)


def worker(args) -> dict:
    """Runs in its own process: load, tune, save; returns its timings and peak RSS."""
    import torch

    from hf_autoround import AutoRound

    torch.set_num_threads(args.threads)
    floor = rss_mb()
    start = time.perf_counter()
    if args.mode == "low":
        from hf_autoround.tuning.lazy_blocks import load_lazily

        model = load_lazily(args.model)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    loaded = rss_mb()
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(1, SHAPE["vocab_size"], (args.seqlen,), generator=generator) for _ in range(args.nsamples)]
    ar = AutoRound(model, None, bits=4, group_size=128, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                   batch_size=min(8, args.nsamples), dataset=data, progress=False,
                   low_cpu_mem_usage=args.mode == "low")
    ar.quantize_and_save(args.out)
    return {"after_imports_mb": floor, "after_load_mb": loaded, "peak_rss_mb": rss_mb(), "vm_hwm_mb": vm_hwm_mb(),
            "seconds": time.perf_counter() - start}


def _subprocess(*flags) -> str:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run(args, model_dir: str, mode: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"out-{mode}-{os.path.basename(model_dir)}")
    stdout = _subprocess("--worker", "--mode", mode, "--model", model_dir, "--out", out, "--iters", str(args.iters),
                         "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--threads",
                         str(args.threads))
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| layers | float model (MiB) | normal peak RSS (MiB) | low-memory peak RSS (MiB) | after imports (MiB) |"
             " normal s | low-memory s |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['model_mb']:.0f} | {r['normal']['peak_rss_mb']:.0f} | "
                     f"{r['low']['peak_rss_mb']:.0f} | {r['low']['after_imports_mb']:.0f} | "
                     f"{r['normal']['seconds']:.0f} | {r['low']['seconds']:.0f} |")
    return "\n".join(lines)


def spread(values: list[float]) -> float:
    """(max - min) / min."""
    return (max(values) - min(values)) / min(values)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "memory.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("normal", "low"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--build", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.build:
        build_model(args.model, args.build)
        return
    rows, tmp = [], tempfile.mkdtemp(prefix="hf_autoround-memory-")
    try:
        for layers in args.layers:
            model_dir = os.path.join(tmp, f"llama-{layers}")
            _subprocess("--build", str(layers), "--model", model_dir)
            size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)) / 2**20
            row = {"layers": layers, "model_mb": size}
            for mode in ("normal", "low"):
                row[mode] = run(args, model_dir, mode, tmp)
                print(f"{layers} layers, {mode}: peak {row[mode]['peak_rss_mb']:.0f} MB, "
                      f"{row[mode]['seconds']:.0f} s", flush=True)
            shutil.rmtree(model_dir)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "settings": {"shape": SHAPE, "iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                     "threads": args.threads, "scheme": "W4G128 sym", "dtype": "float32"},
        "rows": rows,
        "low_memory_peak_spread": spread([r["low"]["peak_rss_mb"] for r in rows]),
        "normal_peak_spread": spread([r["normal"]["peak_rss_mb"] for r in rows]),
    }
    print(table(rows))
    print(f"peak RSS spread across depths: low-memory {100 * result['low_memory_peak_spread']:.1f} %, "
          f"normal {100 * result['normal_peak_spread']:.1f} %")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
