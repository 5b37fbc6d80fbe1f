"""Where a block's output error sits: the share of the squared error carried by the first token of each sample.

For SmolLM2-135M (or ``--model``) on ``--nsamples`` x ``--seqlen`` calibration samples from the bundled English set,
compares the residual stream after every block of the float model with that of the same model with every block's
linears round-to-nearest quantised (``--bits`` / ``--group-size``, symmetric). Per block it prints

- ``|h|^2 first``: the share of the float hidden states' squared norm on the first token of each sample;
- ``err first``: the share of the squared error on the first token of each sample;
- ``rel err first``: the same share once each token's error is divided by its float mean square (what the
  ``relative`` block loss of ``hf_autoround.tuning.block_loss`` weighs).

The first tokens are ``1 / seqlen`` of all tokens; where ``err first`` is large, a plain MSE block loss spends the
tuning on them. Command:

    .venv/bin/python benchmarks/token_error.py

Output: the table on stdout (kept in ``benchmarks/results/token_error.txt``) and ``benchmarks/results/token_error.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)


def hidden_states(model, ids: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The residual stream after each block (not the final norm), ``[n, seq, hidden]`` each."""
    blocks = model.model.layers
    per_block: list[list[torch.Tensor]] = []
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
             for b in blocks]
    try:
        with torch.no_grad():
            for chunk in ids.split(batch):
                outs.clear()
                model(chunk)
                per_block.append(list(outs))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat([p[i] for p in per_block]) for i in range(len(blocks))]


def first_token_shares(fp: torch.Tensor, q: torch.Tensor) -> dict:
    norm = fp.pow(2).sum(-1)  # [n, seq]
    err = (q - fp).pow(2).sum(-1)
    rel = err / norm.clamp(min=1e-12)
    return {"norm_first": float(norm[:, 0].sum() / norm.sum()), "err_first": float(err[:, 0].sum() / err.sum()),
            "rel_err_first": float(rel[:, 0].sum() / rel.sum())}


def rtn_copy(model, bits: int, group_size: int):
    import copy

    from hf_autoround.qdq import qdq
    from hf_autoround.scheme import QuantScheme

    scheme = QuantScheme(bits, group_size, True)
    q = copy.deepcopy(model)
    with torch.no_grad():
        for module in q.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(qdq(module.weight, scheme))
    return q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a float checkpoint folder (default: the bundled SmolLM2-135M)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "token_error.json"))
    args = p.parse_args()

    from hf_autoround.models import bundled_float_dir, load_model
    from hf_autoround.tuning import get_calibration_data

    model, tok = load_model(args.model or bundled_float_dir())
    model = model.float().eval()
    ids = get_calibration_data(None, tok, args.seqlen, args.nsamples, 42).input_ids
    fp = hidden_states(model, ids, 8)
    q = hidden_states(rtn_copy(model, args.bits, args.group_size), ids, 8)
    rows = [dict(block=i, **first_token_shares(f, g)) for i, (f, g) in enumerate(zip(fp, q))]
    print(f"W{args.bits}G{args.group_size} sym RTN, {args.nsamples} x {args.seqlen} calibration tokens; shares of "
          f"the first token of each sample ({1 / args.seqlen:.1%} of the tokens)")
    print("| block | |h|^2 first | err first | rel err first |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['block']} | {r['norm_first']:.3f} | {r['err_first']:.3f} | {r['rel_err_first']:.3f} |")
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
