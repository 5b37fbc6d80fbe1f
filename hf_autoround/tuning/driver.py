"""``tune_model``: calibration data -> cached block inputs -> per block: float targets, SignRound (or optimised
RTN for iters 0), pack, quantized outputs to the next block. Layers planned outside the blocks get RTN."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import torch
import torch.nn as nn

from ..qdq import quantize_weight
from ..quant_linear import QuantLinear
from .allocator import reuse_freed_memory
from .bf16_matmul import bf16_speed
from .block_group import BlockGroup, group_indices
from .block_loss import chunked_mse
from .cache import BlockInputs, capture_block_inputs, forward_block, run_block
from .channel_scaling import InputGram, exact_sites, find_sites, scale_block
from .data import get_calibration_data
from .layer_loss import FirstInputs, layer_losses
from .opt_rtn import ActivationStats, search_scales
from .options import TuningOptions
from .report import BlockStats, Progress, TuningReport
from .session import BlockSession
from .signround import LayerParams, tune_block, wrapped

logger = logging.getLogger(__name__)


def tune_model(model: nn.Module, plan, config, tokenizer=None, dataset=None, progress: bool = True,
               **kwargs) -> TuningReport:
    """Quantise every layer of ``plan`` with SignRound; every planned layer ends packed via ``pack_layer``."""
    options = TuningOptions.from_config(config, **kwargs)
    _log_precision(options)
    reuse_freed_memory()
    data = get_calibration_data(dataset, tokenizer, options.seqlen, options.nsamples, config.seed)
    report = options.report if options.report is not None else TuningReport()
    report.started, report.nsamples = time.perf_counter(), data.nsamples
    if config.iters:
        report.bf16_forward, report.bf16_backward = options.signround.bf16.forward, options.signround.bf16.backward
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    containers = [model.get_submodule(name) for name in plan.block_names]
    session = BlockSession.open(model, plan, options, data)  # resume, low-memory and offloaded models
    bar = Progress(sum(len(c) for c in containers), progress, "SignRound" if config.iters else "RTN (optimised)")
    try:
        for name, container in zip(plan.block_names, containers):
            _tune_container(model, name, container, plan, data, options, report, bar, session)
    finally:
        bar.close()
        model.train(was_training)
    session.close()
    if options.gguf is None:  # on a GGUF grid the writer quantises what lies outside the blocks
        _rtn_outside_blocks(model, plan)
    report.finish()
    logger.info(report.summary())
    if progress:
        bar.bar.write(report.summary())
    return report


def _log_precision(options: TuningOptions) -> None:
    sr = options.signround
    if sr.iters == 0:
        return
    if sr.amp:
        precision = "forward under bf16 autocast"
    else:
        precision = f"losses and propagated outputs in float32; tuned linears: {sr.bf16.describe()}"
    logger.info("SignRound: %s block loss; %s (%s; bf16_forward / bf16_backward choose)", sr.loss, precision,
                bf16_speed().describe())


def _tune_container(model, name, container, plan, data, options: TuningOptions, report, bar,
                    session: BlockSession) -> None:
    per_block = [_block_layers(plan, f"{name}.{i}") for i in range(len(container))]
    last = max((i for i, layers in enumerate(per_block) if layers), default=-1)
    if last < 0:
        bar.bar.update(len(container))
        return
    inputs = capture_block_inputs(model, container[0], data, _cache_dtype(model, options))
    first, fp_hidden, q_hidden = session.restore(name, container, inputs, report, bar)
    # blocks after the last planned layer stay as they are; blocks before `first` were finished by a resumed run
    for indices in group_indices(first, last, options.nblocks):
        unit, prefix, layers = _tuning_unit(name, container, indices, per_block)
        label = prefix if len(indices) == 1 else f"{name}.{indices[0]}-{indices[-1]}"
        stats = BlockStats(label, len(layers))
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for index in indices:
                stack.enter_context(session.tuning(f"{name}.{index}", container[index]))
            stack.enter_context(_fp32_block(unit))
            fp_hidden, q_hidden = _process_block(model, unit, prefix, layers, inputs, fp_hidden, q_hidden,
                                                 options, indices[0], stats, plan.packing_format)
        # the captured first-block input is read no more: keeping it would hold one more copy of the hidden states
        inputs = dataclasses.replace(inputs, hidden=fp_hidden)
        stats.seconds = time.perf_counter() - start
        report.blocks.append(stats)
        for index in indices:
            rewritten = _rewritten_floats(container[index], per_block[index], stats.scaling,
                                          "" if len(indices) == 1 else f"{index}.")
            session.finished(name, index, container[index], per_block[index], fp_hidden, q_hidden, stats,
                             rewritten)
        logger.debug("%s: channel scaling alphas %s; loss %.4g -> %.4g (iter %d), output mse %.4g, %.1f s", label,
                     stats.scaling, stats.first_loss, stats.best_loss, stats.best_iter, stats.output_mse,
                     stats.seconds)
        bar.update(stats, blocks=len(indices))
    bar.bar.update(len(container) - last - 1)


def _cache_dtype(model: nn.Module, options: TuningOptions) -> torch.dtype:
    """The dtype the calibration set's hidden states are kept in between passes (every pass computes in float32):
    ``cache_dtype`` when given; else bfloat16 for a float32 model, which halves the largest memory of the run at
    no measured cost in accuracy (README, *Measured*); else the model's own dtype."""
    if options.cache_dtype is not None:
        return options.cache_dtype
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.bfloat16 if dtype == torch.float32 else dtype


def _tuning_unit(name: str, container, indices: list[int], per_block: list[dict]):
    """(module, packing prefix, planned layers relative to it) for one block or a group of them."""
    if len(indices) == 1:
        return container[indices[0]], f"{name}.{indices[0]}", per_block[indices[0]]
    layers = {f"{i}.{n}": s for i in indices for n, s in per_block[i].items()}
    return BlockGroup(indices, [container[i] for i in indices]), name, layers


def _rewritten_floats(block: nn.Module, planned, scaling: dict[str, float], unit_prefix: str) -> list[str]:
    """Keys (relative to ``block``) of the float tensors that channel scaling rewrote and that no packed layer
    holds (a norm's weight); ``unit_prefix`` is the block's prefix within a group of blocks ("" for one block)."""
    keys = []
    for site, alpha in scaling.items():
        if alpha == 0 or not site.startswith(unit_prefix) or site[len(unit_prefix):] in planned:
            continue
        source = site[len(unit_prefix):]
        keys += [f"{source}.{k}" for k, _ in block.get_submodule(source).named_parameters(recurse=False)]
    return keys


def _block_layers(plan, prefix: str) -> dict:
    """Planned layers of one block, by name relative to the block."""
    return {n[len(prefix) + 1:]: s for n, s in plan.quantized.items() if n.startswith(prefix + ".")}


def _process_block(model, block, prefix, layers, inputs: BlockInputs, fp_hidden, q_hidden, options, index,
                   stats: BlockStats, packing_format):
    """Tune and pack one block; returns the next block's (float inputs, quantized inputs).

    The two passes over the calibration set write their outputs over their inputs, which nothing reads afterwards:
    the float targets over ``fp_hidden`` (unless it is also ``q_hidden``, still to be tuned on), the quantized
    outputs over the hidden states tuned on. So the calibration set's hidden states are held twice, not four times."""
    compute = torch.float32  # every pass; results are stored in the hidden states' (the cache's) dtype
    batch = options.signround.chunk_samples(fp_hidden.shape[1])  # samples per forward of each pass
    if options.gguf is not None:
        layers = _grid_targets(block, prefix, layers, options.gguf)
    want_stats = bool(layers) and options.wants_opt_rtn
    sites = _scale_sites(block, layers, options, index, inputs, fp_hidden)
    with contextlib.ExitStack() as stack:  # statistics of the linears' inputs, gathered on the float pass
        act = stack.enter_context(ActivationStats(block, layers)) if want_stats else None
        grams = stack.enter_context(InputGram(block, sites))
        targets = run_block(block, inputs, fp_hidden, batch, compute,
                            into=None if q_hidden is fp_hidden else fp_hidden)
    if not layers:
        if q_hidden is fp_hidden:
            return targets, targets
        return targets, run_block(block, inputs, q_hidden, batch, compute, into=q_hidden)
    stats.scaling = scale_block(block, layers, sites, grams.grams, act.sums if act else None)
    init = {n: search_scales(block.get_submodule(n).weight, s, act.sums[n]) for n, s in layers.items()} \
        if want_stats else None
    tuned_on = q_hidden if options.enable_quanted_input else fp_hidden
    result = tune_block(block, layers, inputs, tuned_on, targets, options.block_settings(index), init)
    stats.first_loss, stats.best_loss, stats.best_iter = result.first_loss, result.best_loss, result.best_iter
    with wrapped(block, layers, result.params):  # float32 products: bf16 ones here measured worse (see InputGram)
        with FirstInputs(block, layers) as seen:
            q_out = run_block(block, inputs, tuned_on, batch, compute, into=tuned_on)
        stats.layer_losses = layer_losses(block, seen.inputs, layers)
    stats.output_mse = chunked_mse(q_out, targets, inputs.token_mask)
    if options.gguf is not None:
        _store_grid_block(block, prefix, layers, result.params, options.gguf)
    else:
        _pack_block(model, block, prefix, layers, result.params, packing_format)
    return targets, (q_out if options.enable_quanted_input else targets)


def _scale_sites(block, layers, options: TuningOptions, index: int, inputs: BlockInputs, fp_hidden) -> list:
    """Where channel scaling applies in this block: the named sites whose fold proves exact on one calibration
    sample (none when scaling is off or nothing is planned); logged for the first block."""
    if not layers or not options.scales_channels:
        return []
    def probe():
        return forward_block(block, inputs, fp_hidden, torch.arange(1), torch.float32)

    named = find_sites(block, layers)
    sites = exact_sites(block, named, probe) if named else []
    if index == 0:
        left = sorted({s.source for s in named} - {s.source for s in sites})
        logger.info("channel scaling in %s: sites %s%s", type(block).__name__, [s.source for s in sites] or "none",
                    f"; not exact, left alone: {left}" if left else "")
    return sites


def _pack_block(model, block, prefix, layers, params: dict[str, LayerParams], packing_format) -> None:
    from ..quantize import pack_layer

    for name, scheme in layers.items():
        p = params[name]
        weight = block.get_submodule(name).weight
        qw = quantize_weight(weight, scheme, v=p.v, min_scale=p.min_scale, max_scale=p.max_scale)
        pack_layer(model, f"{prefix}.{name}", qw, packing_format)


def _grid_targets(block, prefix, layers, gguf) -> dict:
    """The GGUF grid of each planned layer the file stores quantised (the others stay float)."""
    grids = {n: gguf.grid(f"{prefix}.{n}", block.get_submodule(n).weight) for n in layers}
    return {n: g for n, g in grids.items() if g is not None}


def _store_grid_block(block, prefix, grids, params: dict[str, LayerParams], gguf) -> None:
    for name, grid in grids.items():
        gguf.store(block.get_submodule(name), f"{prefix}.{name}", grid, params[name].v)


@torch.no_grad()
def _rtn_outside_blocks(model, plan) -> None:
    from ..quantize import pack_layer

    for name, scheme in plan.quantized.items():
        if any(name.startswith(b + ".") for b in plan.block_names):
            continue
        pack_layer(model, name, quantize_weight(model.get_submodule(name).weight, scheme), plan.packing_format)


@contextlib.contextmanager
def _fp32_block(block: nn.Module):
    """Run the block in fp32 (tuning and its targets); afterwards cast its float tensors back, QuantLinear
    scales excepted (they keep their checkpoint dtype)."""
    dtypes = {id(t): t.dtype for t in list(block.parameters()) + list(block.buffers()) if t.is_floating_point()}
    original = next((d for d in dtypes.values()), torch.float32)
    if original == torch.float32:
        yield
        return
    block.float()
    try:
        yield
    finally:
        for module in block.modules():
            tensors = [module.bias] if isinstance(module, QuantLinear) and module.bias is not None else None
            if tensors is None and not isinstance(module, QuantLinear):
                tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            for t in tensors or []:
                if t.is_floating_point():
                    t.data = t.data.to(original)
