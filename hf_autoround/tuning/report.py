"""What a tuning run did: per-block losses, wall time, peak memory; the progress bar and the end summary."""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


@dataclass
class BlockStats:
    name: str
    layers: int
    first_loss: float = float("nan")  # loss of the first tuning step (RTN parameters)
    best_loss: float = float("nan")  # loss of the kept parameters
    best_iter: int = -1
    output_mse: float = float("nan")  # final quantized block output vs float target, all samples
    seconds: float = 0.0
    # layer name (relative to the block) -> (output MSE with RTN parameters, with the kept ones); see layer_loss
    layer_losses: dict[str, tuple[float, float]] = field(default_factory=dict)
    scaling: dict[str, float] = field(default_factory=dict)  # channel-scaling site -> alpha chosen (0: left alone)

    @property
    def reduction(self) -> float:
        """Relative loss reduction first -> best (0.25 = 25 % lower)."""
        if not (self.first_loss > 0) or math.isnan(self.best_loss):
            return float("nan")
        return 1.0 - self.best_loss / self.first_loss


@dataclass
class TuningReport:
    blocks: list[BlockStats] = field(default_factory=list)
    nsamples: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    # the tuned linears' products as run: what bf16_forward / bf16_backward ("auto": a timing) chose
    bf16_forward: bool = False
    bf16_backward: bool = False

    def finish(self) -> None:
        self.seconds = time.perf_counter() - self.started
        self.peak_rss_mb = peak_rss_mb()

    @property
    def mean_reduction(self) -> float:
        values = [b.reduction for b in self.blocks if not math.isnan(b.reduction)]
        return sum(values) / len(values) if values else float("nan")

    def summary(self) -> str:
        tuned = sum(b.layers > 0 for b in self.blocks)
        text = (f"quantized {tuned} blocks on {self.nsamples} samples in {self.seconds:.1f} s, "
                f"peak RSS {self.peak_rss_mb:.0f} MiB")
        if not math.isnan(self.mean_reduction):
            text += f", mean block loss reduction {100 * self.mean_reduction:.1f} % (first step -> best)"
        bf16 = [part for part, on in (("forward", self.bf16_forward), ("backward", self.bf16_backward)) if on]
        text += f", {' and '.join(bf16)} products in bf16" if bf16 else ""
        alphas = [a for b in self.blocks for a in b.scaling.values()]
        if alphas:
            text += f", channel scaling at {sum(a > 0 for a in alphas)} of {len(alphas)} sites"
        return text


class Progress:
    """A tqdm bar over blocks showing the last block's loss first -> best; ETA from tqdm."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="block", disable=not enabled, dynamic_ncols=True)

    def update(self, stats: BlockStats, blocks: int = 1) -> None:
        if math.isnan(stats.first_loss):
            self.bar.set_postfix_str(f"{stats.name} out-mse {stats.output_mse:.3g}")
        else:
            self.bar.set_postfix_str(f"{stats.name} loss {stats.first_loss:.3g}->{stats.best_loss:.3g}")
        self.bar.update(blocks)

    def close(self) -> None:
        self.bar.close()
