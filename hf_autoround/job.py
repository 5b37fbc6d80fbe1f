"""The CLI's job: load, evaluate float, quantise, save, evaluate the saved checkpoint, report."""
from __future__ import annotations

import logging
import os
import time

import torch

from .eval.report import EvalTable

logger = logging.getLogger(__name__)


def evaluate(model_or_path, tokenizer, args) -> dict[str, float]:
    """Perplexity on the eval text, plus lm-eval tasks when ``--tasks`` is given; one flat dict of rows."""
    from transformers import AutoModelForCausalLM

    from .eval.perplexity import perplexity, read_text, token_ids

    model = model_or_path
    if isinstance(model_or_path, str):
        model = AutoModelForCausalLM.from_pretrained(model_or_path).eval()  # as a user would, no wrapper
    ids = token_ids(tokenizer, read_text(args.eval_text), args.eval_tokens)
    rows = {"perplexity (text)": perplexity(model, ids, seqlen=min(2048, ids.numel()), progress=not args.quiet)}
    if args.tasks:
        from .eval.lm_eval_tasks import evaluate as lm_eval_evaluate, headline

        results = lm_eval_evaluate(model_or_path, args.tasks, batch_size=args.eval_bs, limit=args.eval_limit,
                                   tokenizer=tokenizer)
        for task, metrics in results.items():
            if task == "lambada" and "perplexity" in metrics:
                rows["lambada perplexity"] = metrics["perplexity"]
                metrics = {k: v for k, v in metrics.items() if k != "perplexity"}
            metric, value = headline(metrics)
            rows[f"{task} {metric}"] = value
    return rows


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def run_job(args, config) -> EvalTable:
    from .export import check_output_dir, export_model
    from .models import load_model
    from .quantize import quantize_model

    table = EvalTable()
    if config is None:  # --eval alone: evaluate what was given
        model, tokenizer = load_model(args.model, _dtype(args.model_dtype))
        table.add(os.path.basename(os.path.normpath(args.model)), evaluate(model, tokenizer, args))
        print(table.markdown())
        return table
    check_output_dir(args.output_dir, args.overwrite)  # fail before minutes of work, not after
    model, tokenizer = load_model(args.model, _dtype(args.model_dtype))
    if not args.disable_eval:
        table.add("float", evaluate(model, tokenizer, args))
    start = time.perf_counter()
    quantize_model(model.to(args.device), config, tokenizer=tokenizer, dataset=args.dataset,
                   progress=not args.quiet)
    logger.info("quantisation took %.1f s", time.perf_counter() - start)
    targets = export_model(model.cpu(), tokenizer, args.output_dir, args.format, overwrite=args.overwrite)
    first = next(iter(targets.values()))
    if not args.disable_eval:
        table.add(config.scheme.describe(), evaluate(first, tokenizer, args))
        table.save(first)
        print(table.markdown())
    return table
