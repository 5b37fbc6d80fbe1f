"""``hf-autoround``: the command line, with the flags and meanings of the reference ``auto-round`` command.

Every flag value is checked (and the config built) before any model is loaded. The job: load the model, evaluate
the float model, quantise, save in each requested format, evaluate the saved checkpoint, print and write a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger("hf_autoround")

EPILOG = """recipes: default (iters 200, nsamples 128), best (iters 1000, nsamples 512), light (iters 50, lr 5e-3),
rtn (iters 0; optimised RTN when calibration data is given). Explicit flags override the recipe."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except on flags whose default is not their own (``--asym``) or is implied by the text."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _bool_pair(parser, name, default, help_on, help_off):
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=help_on)
    group.add_argument(f"--{help_off[0]}", dest=name, action="store_false", help=help_off[1])


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL
    from .tuning.block_loss import LOSSES
    from .tuning.signround import SignRoundSettings

    p = argparse.ArgumentParser(prog="hf-autoround", epilog=EPILOG, formatter_class=_HelpFormatter,
                                description="Quantise a causal LM with AutoRound (SignRound), save it, evaluate it.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a local checkpoint folder, a .gguf file, or the name of a bundled model")
    p.add_argument("--recipe", choices=("default", "best", "light", "rtn"), default="default",
                   help="a named set of tuning settings (see below)")
    p.add_argument("--bits", type=int, default=4, help="weight bits: 2, 3, 4 or 8")
    p.add_argument("--group_size", type=int, default=128, help="weights per scale; -1 = one per output channel")
    _bool_pair(p, "sym", True, "symmetric quantisation", ("asym", "asymmetric quantisation (with zero points)"))
    p.add_argument("--iters", type=int, default=None, help="tuning steps per block; 0 = round-to-nearest "
                                                           "(default: from the recipe)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration samples (default: from the recipe)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sample (default 2048)")
    p.add_argument("--batch_size", type=int, default=None, help="samples per tuning step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the rounding (default 1/iters)")
    p.add_argument("--minmax_lr", type=float, default=None, help="learning rate of the range scales (default lr)")
    p.add_argument("--nblocks", type=int, default=1,
                   help="consecutive blocks tuned together, with one loss at the last one's output (not with "
                        "--resume)")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="the block loss: 'relative' divides each token's squared error by its float target's mean "
                        "square, 'mse' is the reference's plain MSE (default: %s)" % SignRoundSettings.loss)
    p.add_argument("--momentum", type=float, default=None,
                   help="beta of the rounding's sign-of-momentum step, e.g. 0.5; 0 = the reference's sign of each "
                        "batch's gradient (default: %s)" % SignRoundSettings.momentum)
    p.add_argument("--chunk_tokens", type=int, default=None,
                   help="the most tokens one forward/backward of a tuning step runs at once; a step's batch is split "
                        "into chunks of whole samples (the result does not change; lower = less memory) "
                        "(default: %s)" % SignRoundSettings.chunk_tokens)
    p.add_argument("--disable_channel_scaling", action="store_true",
                   help="do not fold activation-aware channel scales into the norms before tuning (on by default: "
                        "loud input channels get more of each group's grid)")
    p.add_argument("--enable_torch_compile", action="store_true",
                   help="run each tuning step's block forward and loss through torch.compile (needs a C++ "
                        "compiler; compiled once per process; off by default: on a 2-core Xeon a step took 0.84x the "
                        "eager time, but a whole SmolLM2-135M run only 0.95x, benchmarks/step_floor.py and README)")
    p.add_argument("--dataset", default=None,
                   help="calibration data: local .txt/.json/.jsonl files, combined as 'a.jsonl:num=256,b.txt' "
                        "(default: the calibration set bundled with the package)")
    p.add_argument("--layer_config", default=None,
                   help='per-layer overrides as JSON or a JSON file: {"mlp.down_proj": {"bits": 8}}')
    p.add_argument("--fp_layers", default=None, help="comma list of layer names or regexes kept in float")
    p.add_argument("--quant_lm_head", action="store_true", help="quantise the lm_head too (not when tied)")
    p.add_argument("--format", default="auto_round",
                   help="comma list of output formats; several formats go to sub-directories of output_dir")
    p.add_argument("--output_dir", default="./tmp_autoround", help="where the checkpoint is written")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    p.add_argument("--device", default="cpu", help="device for tuning: cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true",
                   help="checkpoint every finished block and continue a killed run from its last finished block "
                        "(same flags, same result, bit for bit); the checkpoints are deleted after the save")
    p.add_argument("--resume_dir", default=None, help="where --resume keeps its checkpoints (default: "
                                                      "<output_dir>.resume)")
    p.add_argument("--low_cpu_mem_usage", action="store_true",
                   help="read the blocks from the checkpoint files one at a time while tuning (peak memory about "
                        "one block; the float model is not evaluated)")
    p.add_argument("--model_dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the float model is loaded in")
    p.add_argument("--seed", type=int, default=42, help="random seed (same seed, same checkpoint)")
    p.add_argument("--eval", action="store_true",
                   help="evaluate; alone (no quantisation flags needed) it evaluates --model as it is")
    p.add_argument("--disable_eval", action="store_true", help="skip the evaluation after quantising")
    p.add_argument("--eval_text", default=None, help="text file for the perplexity check (default: bundled text)")
    p.add_argument("--eval_tokens", type=int, default=16384, help="tokens of eval_text used for perplexity")
    p.add_argument("--tasks", default=None, help="comma list of lm-eval tasks (local task configs are bundled)")
    p.add_argument("--eval_bs", type=int, default=8, help="batch size for evaluation")
    p.add_argument("--eval_limit", type=int, default=None, help="examples per lm-eval task (default: all)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="only warnings and the result table")
    verbosity.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv=None):
    """Parse and validate; returns (args, AutoRoundConfig or None when only evaluating)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = None if _eval_only(args, argv) else build_config(args)
        from .tuning.options import check_device

        check_device(args.device)
        if args.resume_dir and not args.resume:
            raise ValueError("--resume_dir is given without --resume")
        if config is not None:
            from .export import parse_formats

            parse_formats(args.format, scheme=config, output_dir=args.output_dir, overwrite=args.overwrite)
    except ValueError as err:
        parser.error(str(err))
    return args, config


def _eval_only(args, argv) -> bool:
    return args.eval and not any(a.startswith(("--bits", "--iters", "--recipe", "--format", "--output_dir"))
                                 for a in (argv if argv is not None else sys.argv[1:]))


def _load_layer_config(value):
    if value is None:
        return {}
    text = value
    if not value.lstrip().startswith("{"):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--layer_config is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError("--layer_config must be a JSON object of layer name -> overrides")
    return data


def build_config(args):
    from .config import AutoRoundConfig
    from .recipes import apply_recipe

    settings = apply_recipe(args.recipe, {k: getattr(args, k) for k in
                                          ("iters", "nsamples", "seqlen", "batch_size", "lr", "minmax_lr")})
    extra = _load_layer_config(args.layer_config)
    for name in filter(None, (args.fp_layers or "").split(",")):
        extra[name.strip()] = {"bits": 16}
    return AutoRoundConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, seed=args.seed,
                           extra_config=extra, quant_lm_head=args.quant_lm_head, **settings)


def _setup_logging(args):
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quiet:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv=None) -> int:
    args, config = parse_args(argv)
    _setup_logging(args)
    from .job import run_job

    run_job(args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
