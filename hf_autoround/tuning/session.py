"""What happens around each block besides tuning it: making its weights real (low-memory and offloaded models),
storing its packed layers (low-memory mode, resume), checkpointing the next block's inputs (resume), and putting
finished blocks back when a run resumes. The driver calls three methods:

- ``restore(container, blocks, inputs, report, bar)``: before the first block; returns where to start and the
  hidden states to start from;
- ``tuning(prefix, block)``: a context around one block's tuning;
- ``finished(container, index, block, layers, fp_hidden, q_hidden, stats, rewritten)``: after it.

With no resume directory and an in-memory model every call does nothing.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from .block_store import BlockStore
from .report import BlockStats
from .resume import Fingerprint, ResumeState, digest
from .weight_source import WeightSource, weight_source

logger = logging.getLogger(__name__)


class BlockSession:
    def __init__(self, model: nn.Module, source: WeightSource, store: BlockStore | None = None,
                 resume: ResumeState | None = None):
        self.model, self.source, self.store, self.resume = model, source, store, resume
        self._weights_hash: str | None = None

    @classmethod
    def open(cls, model: nn.Module, plan, options=None, data=None) -> "BlockSession":
        source = weight_source(model)
        resume_dir = getattr(options, "resume_dir", None)
        if getattr(options, "low_cpu_mem_usage", False) and source.all_in_memory:
            logger.warning("low_cpu_mem_usage=True has no effect on a model that is already in memory; give the "
                           "model as a checkpoint folder (AutoRound(path, ...), the CLI) or load it with "
                           "hf_autoround.models.load_model(path, low_cpu_mem_usage=True)")
        if getattr(options, "gguf", None) is not None and (resume_dir or not source.keeps_blocks):
            raise ValueError("resume=True and low_cpu_mem_usage=True do not support tuning on GGUF grids yet")
        if not source.keeps_blocks and len(plan.block_names) > 1:
            raise ValueError(f"low_cpu_mem_usage=True tunes one list of blocks; this plan has {plan.block_names}")
        store = None
        if not source.keeps_blocks:
            store = source.use_store(resume_dir)
        elif resume_dir:
            store = BlockStore(resume_dir)
        resume = ResumeState.open(resume_dir, Fingerprint.of(model, plan, options, data)) if resume_dir else None
        return cls(model, source, store, resume)

    def restore(self, container: str, blocks, inputs, report, bar):
        """(index of the first block to tune, its float inputs, its quantized inputs)."""
        if self.resume is None:
            return 0, inputs.hidden, inputs.hidden
        self.resume.check_inputs(container, inputs)
        finished = self.resume.finished(container)
        for index, record in enumerate(finished):
            prefix, block = f"{container}.{index}", blocks[index]
            self.resume.check_weights(container, index, digest(self.source.float_state(prefix, block)))
            if self.source.keeps_blocks:  # offloaded: its other tensors (norms) must be real too
                self.source.load(prefix, block)
            if self.store.has(prefix):  # a block without planned layers has no file
                self.store.install(block, prefix, on_meta=not self.source.keeps_blocks)
            report.blocks.append(BlockStats(**record["stats"]))
        bar.bar.update(len(finished))
        if not finished:
            return 0, inputs.hidden, inputs.hidden
        fp_hidden, q_hidden, rng = self.resume.load_hidden(container, len(finished))
        torch.set_rng_state(rng)
        logger.info("resume: %s.0-%d restored; tuning from block %d", container, len(finished) - 1, len(finished))
        return len(finished), fp_hidden, q_hidden

    @contextlib.contextmanager
    def tuning(self, prefix: str, block: nn.Module):
        self.source.load(prefix, block)
        if self.resume is not None:  # the same digest as float_state's, now that every tensor is real
            self._weights_hash = digest(block.state_dict())
        yield

    def finished(self, container: str, index: int, block: nn.Module, layers, fp_hidden, q_hidden,
                 stats: BlockStats, rewritten=()) -> None:
        """``rewritten``: float tensors of the block (keys relative to it) that tuning changed, such as the norm
        weights channel scaling divides; stored with the packed layers."""
        prefix = f"{container}.{index}"
        if self.store is not None and layers:
            self.store.save(prefix, block, layers, rewritten)
        if self.resume is not None:
            self.resume.record_block(container, index, self._weights_hash, stats, fp_hidden, q_hidden)
        self.source.release(prefix, block)

    def close(self) -> None:
        self.source.finish()


def rtn_by_block(model: nn.Module, plan, progress: bool = True) -> None:
    """Plain RTN of every planned layer. A model whose blocks are not all in memory (low-memory, offloaded) is
    quantised one block at a time through a BlockSession; an ordinary model by ``rtn_quantize`` as it is."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from ..quantize import rtn_quantize

    session = BlockSession.open(model, plan)
    if session.source.all_in_memory:
        rtn_quantize(model, plan, progress)
        return
    done = set()
    for container in plan.block_names:
        blocks = model.get_submodule(container)
        for index, block in enumerate(tqdm(blocks, desc="RTN", unit="block", disable=not progress)):
            prefix = f"{container}.{index}"
            layers = {n: s for n, s in plan.quantized.items() if n.startswith(prefix + ".")}
            if not layers:
                continue
            with session.tuning(prefix, block):
                rtn_quantize(model, replace(plan, quantized=layers), progress=False)
            session.finished(container, index, block, [n[len(prefix) + 1:] for n in layers], None, None, None)
            done.update(layers)
    session.close()
    outside = {n: s for n, s in plan.quantized.items() if n not in done}
    rtn_quantize(model, replace(plan, quantized=outside), progress=False)
