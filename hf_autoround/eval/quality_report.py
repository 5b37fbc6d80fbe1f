"""The quality report written with every quantised checkpoint: per block, the tuning loss before (first step, i.e.
the RTN starting point) and after (kept parameters), time; per layer, the scheme, the backend it loads with and its
output MSE with RTN and with the tuned parameters (``tuning.layer_loss``); totals (time, peak memory). Written as ``quality_report.json`` and a ``quality_report.png`` plot."""
from __future__ import annotations

import json
import logging
import math
import os

logger = logging.getLogger(__name__)


def build_report(plan, tuning_report, loaded_model=None, seconds: float | None = None) -> dict:
    backends = {}
    if loaded_model is not None:
        from ..quant_linear import QuantLinear

        backends = {n: getattr(m.kernel, "name", "torch") for n, m in loaded_model.named_modules()
                    if isinstance(m, QuantLinear)}
    layers = {name: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "backend": backends.get(name)}
              for name, s in plan.quantized.items()}
    blocks = []
    for b in getattr(tuning_report, "blocks", []):
        for name, (rtn, tuned) in b.layer_losses.items():
            if f"{b.name}.{name}" in layers:
                layers[f"{b.name}.{name}"].update(loss_rtn=_num(rtn), loss_tuned=_num(tuned))
        blocks.append({"name": b.name, "loss_before": _num(b.first_loss), "loss_after": _num(b.best_loss),
                       "best_iter": b.best_iter, "output_mse": _num(b.output_mse), "seconds": b.seconds,
                       "layers": sorted(n for n in layers if n.startswith(b.name + "."))})
    return {
        "packing_format": plan.packing_format,
        "seconds": seconds if seconds is not None else getattr(tuning_report, "seconds", None),
        "peak_rss_mb": getattr(tuning_report, "peak_rss_mb", None),
        "mean_loss_reduction": _num(getattr(tuning_report, "mean_reduction", float("nan"))),
        "blocks": blocks,
        "layers": layers,
        "kept_float": dict(plan.kept_float),
    }


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def write_report(report: dict, directory: str) -> list[str]:
    """Write the JSON (always) and the PNG plot (when there are tuned blocks); returns the file names written."""
    with open(os.path.join(directory, "quality_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    written = ["quality_report.json"]
    blocks = [b for b in report["blocks"] if b["loss_before"] is not None and b["loss_after"] is not None]
    if blocks:
        _plot(blocks, report["layers"], os.path.join(directory, "quality_report.png"))
        written.append("quality_report.png")
    return written


def _plot(blocks: list[dict], layers: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(blocks))
    fig, (ax_loss, ax_time, ax_layers) = plt.subplots(3, 1, figsize=(max(6, len(blocks) * 0.3), 9))
    ax_loss.semilogy(x, [b["loss_before"] for b in blocks], "o-", label="before tuning (RTN)")
    ax_loss.semilogy(x, [b["loss_after"] for b in blocks], "o-", label="after tuning (kept)")
    ax_loss.set_ylabel("block output MSE")
    ax_loss.legend()
    ax_loss.set_title("SignRound: block loss before and after tuning")
    ax_time.bar(x, [b["seconds"] for b in blocks])
    ax_time.set_ylabel("seconds")
    ax_time.set_xlabel("block")
    ax_time.set_xticks(list(x)[:: max(1, len(blocks) // 30)])
    _plot_layers(ax_layers, layers)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_layers(ax, layers: dict) -> None:
    """Per layer (in model order), tuned output MSE relative to RTN's: below 1 = tuning helped that layer."""
    rows = [(n, v["loss_tuned"] / v["loss_rtn"]) for n, v in layers.items()
            if v.get("loss_rtn") and v.get("loss_tuned") is not None]
    if not rows:
        ax.set_visible(False)
        return
    ax.semilogy(range(len(rows)), [r for _, r in rows], ".")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("layer MSE tuned / RTN")
    ax.set_xlabel("quantised layer (model order)")
