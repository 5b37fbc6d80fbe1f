"""The CLI's job: load, evaluate float, quantise, save, evaluate the saved checkpoint, report."""
from __future__ import annotations

import json
import logging
import os
import time

import torch

logger = logging.getLogger(__name__)


def _perplexity_of(model, tokenizer, args) -> float:
    from .eval.perplexity import perplexity, read_text, token_ids

    ids = token_ids(tokenizer, read_text(args.eval_text), args.eval_tokens)
    seqlen = min(2048, ids.numel())
    return perplexity(model, ids, seqlen=seqlen, batch_size=1, progress=not args.quiet)


def _report(rows: dict, output_dir: str | None) -> str:
    lines = ["| model | perplexity | vs float |", "| --- | ---: | ---: |"]
    base = rows.get("float")
    for name, ppl in rows.items():
        ratio = f"{ppl / base:.3f}x" if base else "-"
        lines.append(f"| {name} | {ppl:.3f} | {ratio} |")
    table = "\n".join(lines)
    if output_dir and os.path.isdir(output_dir):
        with open(os.path.join(output_dir, "eval.json"), "w") as f:
            json.dump({"perplexity": rows}, f, indent=2)
        with open(os.path.join(output_dir, "eval.md"), "w") as f:
            f.write(table + "\n")
    return table


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def run_job(args, config) -> dict:
    from .export import check_output_dir, export_model
    from .models import load_model

    if args.tasks:
        raise SystemExit("--tasks: lm-eval task evaluation is not wired into the CLI yet; use "
                         "`lm_eval --model hf --model_args pretrained=DIR` on the saved checkpoint")
    if config is not None:
        check_output_dir(args.output_dir, args.overwrite)  # fail before minutes of work, not after
    model, tokenizer = load_model(args.model, _dtype(args.model_dtype))
    rows: dict[str, float] = {}
    if config is None:  # --eval alone: evaluate what was given
        rows[os.path.basename(os.path.normpath(args.model))] = _perplexity_of(model, tokenizer, args)
        print(_report(rows, None))
        return rows
    if not args.disable_eval:
        rows["float"] = _perplexity_of(model, tokenizer, args)
    from .quantize import quantize_model

    start = time.perf_counter()
    quantize_model(model.to(args.device), config, tokenizer=tokenizer, dataset=args.dataset,
                   progress=not args.quiet)
    logger.info("quantisation took %.1f s", time.perf_counter() - start)
    targets = export_model(model.cpu(), tokenizer, args.output_dir, args.format, overwrite=args.overwrite)
    if not args.disable_eval:
        rows[f"{config.scheme.describe()} (saved)"] = _perplexity_of(_reload(targets), tokenizer, args)
        print(_report(rows, next(iter(targets.values()))))
    return rows


def _reload(targets: dict):
    """Load the first written checkpoint back through plain transformers, as a user would."""
    from transformers import AutoModelForCausalLM

    path = next(iter(targets.values()))
    return AutoModelForCausalLM.from_pretrained(path).eval()
