"""Task accuracy of SmolLM2-135M: float vs RTN vs SignRound (W4G128 sym, W2G64 asym) on the local lm-eval tasks
(lambada, piqa, hellaswag, arc_easy, arc_challenge, winogrande), seed-model-card style, with the average.

Each quantised model is saved and evaluated from disk through lm-eval's own ``hf`` model. Prints a table and
writes JSON after every model; ``--resume`` continues a run that stopped, from that JSON. Usage:
python benchmarks/accuracy.py [--limit 300] [--iters 200] [--nsamples 128] [--seqlen 512] [--resume]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from bench_io import write_json

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_autoround import AutoRoundConfig  # noqa: E402
from hf_autoround.eval.lm_eval_tasks import LOCAL_TASKS, evaluate, headline  # noqa: E402
from hf_autoround.eval.report import EvalTable  # noqa: E402
from hf_autoround.export import export_model  # noqa: E402
from hf_autoround.models import bundled_float_dir, load_model  # noqa: E402
from hf_autoround.quantize import quantize_model  # noqa: E402

SCHEMES = {"W4G128": dict(bits=4, group_size=128, sym=True), "W2G64": dict(bits=2, group_size=64, sym=False)}


def task_rows(results: dict) -> dict:
    rows = {}
    for task, metrics in results.items():
        metrics = dict(metrics)
        if "perplexity" in metrics and "acc" in metrics:
            rows[f"{task} perplexity"] = metrics.pop("perplexity")
        metric, value = headline(metrics)
        rows[f"{task} {metric}"] = value
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300, help="examples per task (None = all)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--schemes", default="W4G128,W2G64")
    ap.add_argument("--eval_bs", type=int, default=16)
    ap.add_argument("--json", default="benchmarks/results/accuracy.json")
    ap.add_argument("--resume", action="store_true", help="keep the columns --json already holds for the same "
                    "settings and compute only the missing ones")
    args = ap.parse_args()
    tasks = ",".join(LOCAL_TASKS)
    table, timings = resumed(args) if args.resume else (EvalTable(), {})
    if "float" not in table.columns:
        table.add("float", task_rows(evaluate(bundled_float_dir(), tasks, args.eval_bs, args.limit)))
        save(args, table, timings)
    for scheme_name in args.schemes.split(","):
        for method, iters in (("RTN", 0), ("SignRound", args.iters)):
            if f"{method} {scheme_name}" in table.columns:
                continue
            model, tok = load_model("smollm2-135m")
            config = AutoRoundConfig(iters=iters, nsamples=args.nsamples, seqlen=args.seqlen,
                                     batch_size=args.batch_size, **SCHEMES[scheme_name])
            start = time.perf_counter()
            quantize_model(model, config, tokenizer=tok, progress=False)
            timings[f"{method} {scheme_name}"] = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                export_model(model, tok, os.path.join(tmp, "q"))
                results = evaluate(os.path.join(tmp, "q"), tasks, args.eval_bs, args.limit)
            table.add(f"{method} {scheme_name}", task_rows(results))
            save(args, table, timings)
    print(f"SmolLM2-135M, {args.limit} examples per task; SignRound iters {args.iters}, nsamples {args.nsamples}, "
          f"seqlen {args.seqlen}")
    print(table.markdown())
    print("quantisation seconds:", {k: round(v, 1) for k, v in timings.items()})


SETTINGS = ("limit", "iters", "nsamples", "seqlen", "batch_size")


def resumed(args) -> tuple[EvalTable, dict]:
    """The table and timings of an earlier run of the same settings (empty when there is none)."""
    if not os.path.isfile(args.json):
        return EvalTable(), {}
    with open(args.json) as f:
        old = json.load(f)
    if any(old["settings"].get(k) != getattr(args, k) for k in SETTINGS):
        sys.exit(f"--resume: {args.json} was written with other settings ({old['settings']})")
    table = EvalTable()
    for column in old["columns"]:
        table.add(column, {row: values[column] for row, values in old["rows"].items() if column in values})
    print("resuming with", table.columns)
    return table, dict(old["quantize_seconds"])


def save(args, table: EvalTable, timings: dict) -> None:
    """Written after every model, so that a long run that dies keeps what it measured."""
    write_json(args.json, {"settings": vars(args), "columns": table.columns, "rows": table.rows,
                           "average": table.averages(), "quantize_seconds": timings})
    print(table.markdown(), flush=True)


if __name__ == "__main__":
    main()
