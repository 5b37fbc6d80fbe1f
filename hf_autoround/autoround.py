"""The seed-compatible API: ``AutoRound(model, tokenizer, bits=4, ...).quantize_and_save(output_dir, format=...)``.

A thin layer over :func:`hf_autoround.quantize.quantize_model` and :func:`hf_autoround.export.export_model`:
arguments become an ``AutoRoundConfig`` (after the recipe's defaults) plus run-time tuning options. Unlike the
reference, ``output_dir`` is used exactly as given (no sub-folder is added).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from .config import AutoRoundConfig
from .formats import KNOWN_FORMATS
from .recipes import apply_recipe
from .scheme import FLOAT_BITS

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^W(\d+)(?:A16)?(?:G(-?\d+))?$", re.IGNORECASE)


@dataclass
class _Settings:
    """What ``AutoRound.__init__`` resolved: the config and the run-time options for ``quantize_model``."""

    config: AutoRoundConfig
    dataset: object = None
    tuning: dict = field(default_factory=dict)


def parse_scheme(scheme: str | None) -> dict:
    """``"W4A16"``, ``"W2G64"``, ``"W4A16G128"`` -> ``{"bits": ..., "group_size": ...}``."""
    if scheme is None:
        return {}
    match = _SCHEME.match(scheme.strip())
    if not match:
        raise ValueError(f"scheme={scheme!r} is not understood; expected e.g. 'W4A16', 'W2G64' (weight-only int)")
    out = {"bits": int(match.group(1))}
    if match.group(2):
        out["group_size"] = int(match.group(2))
    return out


def default_resume_dir(output_dir: str) -> str:
    """``<output_dir>.resume``: a sibling, so that the output directory itself stays empty until the save."""
    return os.path.abspath(output_dir).rstrip(os.sep) + ".resume"


def build_extra_config(layer_config: dict | None, fp_layers) -> dict:
    """``layer_config`` (name/substring/regex -> overrides; an int means bits) and ``fp_layers`` -> extra_config."""
    extra = {}
    for key, value in (layer_config or {}).items():
        if isinstance(value, int) and not isinstance(value, bool):
            value = {"bits": value}
        if isinstance(value, str):
            value = parse_scheme(value)
        if not isinstance(value, dict):
            raise ValueError(f"layer_config[{key!r}]={value!r}: expected a dict such as {{'bits': 8}} or a scheme")
        extra[key] = dict(value)
    if isinstance(fp_layers, str):
        fp_layers = [n for n in fp_layers.split(",") if n.strip()]
    for name in fp_layers or []:
        extra[name.strip()] = {"bits": FLOAT_BITS}
    return extra


class AutoRound:
    """SignRound weight-only quantisation of a causal LM, with the seed's constructor and methods.

    ``model``: an ``nn.Module`` or a name/path for :func:`hf_autoround.models.load_model` (then ``tokenizer``
    may be omitted). ``recipe``: "default", "best", "light" or "rtn" (explicit arguments win). ``dataset``: see
    :mod:`hf_autoround.tuning.data` (None = the bundled English set). ``device`` and ``low_gpu_mem_usage`` are
    accepted for compatibility; this build runs on the CPU. ``enable_torch_compile=True`` runs each tuning step's
    block forward and loss through ``torch.compile`` (``tuning.compiled_step``).

    Precision of the tuning: the float targets, the blocks' propagated outputs and the norms, attention and losses
    are computed in float32; between passes the calibration set's hidden states are stored in ``cache_dtype``
    (default bfloat16 for a float32 model, which halves their memory; "float32" keeps them whole).
    ``bf16_backward`` and ``bf16_forward`` ("auto": on where a bf16 product times faster than a
    float32 one on this CPU, ``tuning.bf16_matmul.bf16_speed``; True / False pin the choice across machines) run
    the tuned linears' backward and forward products in bf16 (``tuning.bf16_matmul``; the forward of the attention
    query/key projections stays float32); ``amp=True`` autocasts the whole block forward to bf16 (less accurate).
    ``init_opt_rtn`` (default True) starts the min/max range factors from the optimised-RTN search.
    ``channel_scaling`` (default True) first folds activation-aware per-channel scales into each block's norms
    (and into ``up_proj`` / ``v_proj`` rows), searched per block on the calibration inputs (``tuning.channel_scaling``).
    ``loss`` ("relative", the default, or the reference's "mse") is the block loss (``tuning.block_loss``);
    ``momentum`` (default 0, the reference's sign of each batch's gradient; 0.5 averages the rounding's gradients
    over steps, ``tuning.signround.RoundingMomentum``) chooses the direction of the rounding's signed steps.
    ``chunk_tokens`` (default 2048) bounds the tokens of one forward / backward: a step's batch (and each pass over
    the calibration set) runs in chunks of whole samples, each chunk's loss weighted by its share of the batch's
    tokens, so the step's result does not change while its activation memory stops growing with
    ``batch_size x seqlen``.

    ``resume=True``: checkpoint every finished block to ``resume_dir`` (``quantize_and_save`` defaults it to
    ``<output_dir>.resume``) and, when it already holds a killed run with the same settings, model and data,
    continue from its last finished block; the result is bit-identical to an uninterrupted run, and the directory
    is deleted once the checkpoint is saved. ``low_cpu_mem_usage=True`` with ``model`` given as a checkpoint
    folder: blocks are read from its safetensors files one at a time (peak memory about one block).
    """

    def __init__(self, model, tokenizer=None, bits: int | None = None, group_size: int | None = None,
                 sym: bool | None = None, iters: int | None = None, nsamples: int | None = None,
                 seqlen: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 minmax_lr: float | None = None, dataset=None, layer_config: dict | None = None, fp_layers=None,
                 to_quant_block_names=None, quant_lm_head: bool = False, seed: int | None = None,
                 recipe: str | None = None, scheme: str | None = None, packing_format: str | None = None,
                 progress: bool = True, **tuning_kwargs):
        if isinstance(model, str):
            from .models import load_model

            lazy = bool(tuning_kwargs.get("low_cpu_mem_usage"))  # blocks stay in the files until tuned
            model, loaded_tokenizer = load_model(model, low_cpu_mem_usage=lazy)
            tokenizer = tokenizer or loaded_tokenizer
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        explicit = dict(parse_scheme(scheme), bits=bits, group_size=group_size, sym=sym, iters=iters,
                        nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, lr=lr, minmax_lr=minmax_lr,
                        seed=seed)
        settings = apply_recipe(recipe, explicit)
        config = AutoRoundConfig(**settings, packing_format=packing_format, quant_lm_head=quant_lm_head,
                                 extra_config=build_extra_config(layer_config, fp_layers),
                                 block_name_to_quantize=to_quant_block_names)
        self.settings = _Settings(config, dataset, dict(tuning_kwargs))
        self.plan = None
        self.report = None

    @property
    def config(self) -> AutoRoundConfig:
        return self.settings.config

    @property
    def quantized(self) -> bool:
        return self.plan is not None

    def quantize(self, gguf_format: str | None = None):
        """Quantise the model in place; returns ``(model, layer_config)`` (layer name -> scheme of each layer).
        ``gguf_format`` (e.g. "gguf:q4_k_m"): tune on that file's own grids (``quantize_and_save`` with that single
        format does this); the model can then be saved in that format only."""
        from .quantize import quantize_model
        from .tuning import TuningReport

        if self.quantized:
            raise ValueError("this AutoRound object has already quantized its model")
        self.report = TuningReport()
        uses_data = self.config.iters > 0 or self.settings.dataset is not None
        kwargs = dict(self.settings.tuning, report=self.report) if uses_data else {}
        if not uses_data and self.settings.tuning:
            logger.info("iters=0 without a dataset: plain RTN; ignoring %s", sorted(self.settings.tuning))
        self.plan = quantize_model(self.model, self.config, tokenizer=self.tokenizer, dataset=self.settings.dataset,
                                   progress=self.progress, gguf_format=gguf_format, **kwargs)
        layer_config = {name: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
                        for name, s in self.plan.quantized.items()}
        return self.model, layer_config

    def save_quantized(self, output_dir: str, format: str = "auto_round", overwrite: bool = False) -> dict:
        """Write the quantised model to ``output_dir`` (exactly; several formats go to sub-folders named after
        them). Returns format -> directory."""
        from .export import export_model

        if not self.quantized:
            raise ValueError("call quantize() before save_quantized(), or use quantize_and_save()")
        written = export_model(self.model, self.tokenizer, output_dir, format, overwrite=overwrite)
        if self.settings.tuning.get("resume"):
            from .tuning.resume import remove_resume_dir

            remove_resume_dir(self.settings.tuning.get("resume_dir"))
        return written

    def quantize_and_save(self, output_dir: str, format: str = "auto_round", overwrite: bool = False):
        """Quantise (packing as the first format asks, when it names a packing) and save; returns
        ``(model, [directories])``. A single quantised GGUF format (``gguf:q4_k_m``) is tuned on that file's
        own grids (the integer scheme is then not used)."""
        from .export import grid_target, parse_formats

        # unknown names, formats that cannot hold the scheme, non-empty targets: all fail before any tuning
        names = parse_formats(format, scheme=self.config, output_dir=output_dir, overwrite=overwrite)
        if self.settings.tuning.get("resume") and not self.settings.tuning.get("resume_dir"):
            self.settings.tuning["resume_dir"] = default_resume_dir(output_dir)
        first = names[0]
        if first != "auto_round" and first in KNOWN_FORMATS and self.config.packing_format is None:
            self.config.packing_format = first
        self.quantize(gguf_format=grid_target(names))
        written = self.save_quantized(output_dir, format, overwrite=overwrite)
        return self.model, list(written.values())
