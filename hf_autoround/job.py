"""The CLI's job: load, evaluate float, quantise, save, evaluate the saved checkpoint, report."""
from __future__ import annotations

import logging
import os
import time

import torch

from .eval.quality_report import build_report, write_report
from .eval.report import EvalTable
from .tuning.report import TuningReport

logger = logging.getLogger(__name__)


def evaluate(model, tokenizer, args, path: str | None = None) -> dict[str, float]:
    """Perplexity on the eval text, plus lm-eval tasks when ``--tasks`` is given (lm-eval loads ``path`` itself
    when given, else evaluates the in-memory model); one flat dict of rows."""
    from .eval.perplexity import perplexity, read_text, token_ids

    ids = token_ids(tokenizer, read_text(args.eval_text), args.eval_tokens)
    rows = {"perplexity (text)": perplexity(model, ids, seqlen=min(2048, ids.numel()), progress=not args.quiet)}
    if args.tasks:
        from .eval.lm_eval_tasks import evaluate as lm_eval_evaluate, headline

        results = lm_eval_evaluate(path or model, args.tasks, batch_size=args.eval_bs, limit=args.eval_limit,
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
    from .export import export_model, grid_target
    from .models import load_model
    from .quantize import quantize_model

    table = EvalTable()
    if config is None:  # --eval alone: evaluate what was given
        model, tokenizer = load_model(args.model, _dtype(args.model_dtype))
        table.add(os.path.basename(os.path.normpath(args.model)), evaluate(model, tokenizer, args))
        print(table.markdown())
        return table
    model, tokenizer = load_model(args.model, _dtype(args.model_dtype), low_cpu_mem_usage=args.low_cpu_mem_usage)
    if not args.disable_eval and args.low_cpu_mem_usage:
        logger.warning("--low_cpu_mem_usage: the float model is not evaluated (that would load it whole)")
    elif not args.disable_eval:
        table.add("float", evaluate(model, tokenizer, args))
    start = time.perf_counter()
    tuning = TuningReport()
    uses_data = config.iters > 0 or args.dataset is not None
    plan = quantize_model(_on_device(model, args.device), config, tokenizer=tokenizer, dataset=args.dataset,
                          **(_tuning_kwargs(args) if uses_data else {}),
                          progress=not args.quiet, gguf_format=grid_target(args.format),
                          **({"report": tuning} if uses_data else {}))
    seconds = time.perf_counter() - start
    logger.info("quantisation took %.1f s", seconds)
    targets = export_model(_on_device(model, "cpu"), tokenizer, args.output_dir, args.format,
                           overwrite=args.overwrite)
    if args.resume:
        from .tuning.resume import remove_resume_dir

        remove_resume_dir(_tuning_kwargs(args)["resume_dir"])
    first = next(iter(targets.values()))
    reloaded = _reload(first)
    files = write_report(build_report(plan, tuning, reloaded, seconds), first)
    if not args.disable_eval and reloaded is None:
        logger.warning("not evaluating: %s is not a folder transformers loads directly; put a transformers "
                       "format first in --format to evaluate", first)
    elif not args.disable_eval:
        table.add(config.scheme.describe(), evaluate(reloaded, tokenizer, args, path=first))
        table.save(first, figures=[f for f in files if f.endswith(".png")])
        print(table.markdown())
    return table


def _tuning_kwargs(args) -> dict:
    """--resume / --resume_dir / --low_cpu_mem_usage / --nblocks / --loss / --momentum / --chunk_tokens /
    --disable_channel_scaling / --enable_torch_compile as tuning keyword arguments."""
    from .autoround import default_resume_dir

    out = {"low_cpu_mem_usage": True} if args.low_cpu_mem_usage else {}
    if args.disable_channel_scaling:
        out["channel_scaling"] = False
    if args.enable_torch_compile:
        out["enable_torch_compile"] = True
    if args.nblocks != 1:
        out["nblocks"] = args.nblocks
    if args.loss is not None:
        out["loss"] = args.loss
    if args.momentum is not None:
        out["momentum"] = args.momentum
    if args.chunk_tokens is not None:
        out["chunk_tokens"] = args.chunk_tokens
    if args.resume:
        out.update(resume=True, resume_dir=args.resume_dir or default_resume_dir(args.output_dir))
    return out


def _on_device(model, device: str):
    """``model.to(device)``, except for a low-memory model, whose blocks are on disk (it stays on the CPU)."""
    from .tuning.lazy_blocks import lazy_blocks_of

    return model if lazy_blocks_of(model) is not None else model.to(device)


def _reload(path: str):
    """The saved checkpoint loaded back through plain transformers, as a user would (no wrapper); None for
    formats transformers does not load directly."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    return AutoModelForCausalLM.from_pretrained(path).eval()
