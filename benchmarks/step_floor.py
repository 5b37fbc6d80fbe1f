"""How close one SignRound step is to its floor: the step of a SmolLM2-135M block against the work it cannot skip.

    .venv/bin/python benchmarks/step_floor.py                 # block 0, W4G128 sym, batch 8 x 256 tokens
    .venv/bin/python benchmarks/step_floor.py --compiled      # also the enable_torch_compile step

A step of SignRound (DESIGN.md §4) runs the block forward with fake-quantised weights, then backward, and moves
``V`` and the range scales. Whatever the implementation, it has to do the block's matrix products: 7 forward,
7 weight gradients (``V`` needs ``dL/dW``) and 4 input gradients (``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj``; the inputs of ``q/k/v`` come from a norm of the fixed block input, so no gradient flows below
them): 18 products. And it has to do the attention, forward and backward. Those two parts, timed alone on the
same shapes, are the floor; the rest (norms, rotary embedding, gated MLP, fake-quantiser, loss, update) is what
fusion could still remove. Everything is timed in interleaved rounds in one process (median over rounds), so
the machine's drift hits every part alike. Inputs are the block's real inputs: embeddings of the bundled
calibration text. Prints a table and writes JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

from bench_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout, not an installed copy
    sys.path.insert(0, ROOT)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INPUT_GRAD = {"self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def block_inputs(model, tok, batch: int, seqlen: int):
    """(block 0, its hidden input ``[batch, seqlen, hidden]``, keyword arguments, float target)."""
    import torch

    from hf_autoround.tuning.data import BUNDLED_CALIB

    with open(BUNDLED_CALIB, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[0]
    if ids.numel() < batch * seqlen:
        raise SystemExit(f"the bundled calibration text has {ids.numel()} tokens, fewer than {batch} x {seqlen}")
    ids = ids[:batch * seqlen].reshape(batch, seqlen)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        pos = torch.arange(seqlen).unsqueeze(0)
        kwargs = {"position_ids": pos, "position_embeddings": model.model.rotary_emb(x, pos)}
        block = model.model.layers[0]
        target = block(x, **kwargs)
    return block, x, kwargs, target[0] if isinstance(target, tuple) else target


def step_fn(block, x, kwargs, target, compiled: bool):
    """One SignRound step on ``block`` (already wrapped): loss forward, backward, signed update."""
    from hf_autoround.tuning.compiled_step import step_loss
    from hf_autoround.tuning.signround import RoundingMomentum, _step

    loss_of = step_loss(compiled)
    momentum = RoundingMomentum(0.0)

    def run(params):
        loss = loss_of(block, x, (), kwargs, target, None, "relative")
        loss.backward()
        _step(params, 1e-3, 1e-3, True, momentum)
    return run


def products_fn(block, tokens: int):
    """The step's 18 matrix products alone: each linear forward, its weight gradient, and the input gradients."""
    import torch
    import torch.nn.functional as F

    parts = []
    for name in LINEARS:
        w = block.get_submodule(name).weight.detach().clone().requires_grad_(True)
        x = torch.randn(tokens, w.shape[1], requires_grad=name in INPUT_GRAD)
        parts.append((x, w, torch.randn(tokens, w.shape[0])))

    def run():
        outs = [F.linear(x, w) for x, w, _ in parts]
        torch.autograd.backward(outs, [g for _, _, g in parts])
        for x, w, _ in parts:
            w.grad = x.grad = None
    return run


def attention_fn(block, batch: int, seqlen: int):
    """Causal scaled-dot-product attention forward and backward on the block's head shapes."""
    import torch
    import torch.nn.functional as F

    cfg = block.self_attn.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    q, k, v = (torch.randn(batch, heads, seqlen, dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seqlen, dim)

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        q.grad = k.grad = v.grad = None
    return run


def fakequant_fn(block, scheme, params):
    """The fused fake-quantiser of every tuned linear, forward and backward."""
    import torch

    from hf_autoround.tuning.fakequant import GroupedWeight, fake_quant

    groups = [GroupedWeight.from_weight(block.get_submodule(n).weight, scheme) for n in LINEARS]
    grads = [torch.randn_like(block.get_submodule(n).weight) for n in LINEARS]

    def run():
        outs = [fake_quant(g, scheme, p.v, p.min_scale, p.max_scale) for g, p in zip(groups, params)]
        torch.autograd.backward(outs, grads)
        for p in params:
            p.v.grad = p.min_scale.grad = p.max_scale.grad = None
    return run


def timed_ms(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def tunable_params(block, scheme) -> dict:
    """Fresh SignRound parameters for every linear of ``block``, with gradients on (the block's own weights off)."""
    from hf_autoround.tuning.signround import LayerParams

    for t in block.parameters():
        t.requires_grad_(False)
    params = {n: LayerParams.initial(block.get_submodule(n).weight, scheme) for n in LINEARS}
    for lp in params.values():
        for t in (lp.v, lp.min_scale, lp.max_scale):
            t.requires_grad_(True)
    return params


def interleaved(steps: dict, parts: dict, params: list, rounds: int) -> dict:
    """Per name, the milliseconds of each round; every function runs once per round, in the same order."""
    for fn in steps.values():  # warm-up (and the compile)
        fn(params)
        fn(params)
    for fn in parts.values():
        fn()
    samples = {name: [] for name in [*steps, *parts]}
    for _ in range(rounds):
        for name, fn in steps.items():
            samples[name].append(timed_ms(fn, params))
        for name, fn in parts.items():
            samples[name].append(timed_ms(fn))
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=50, help="steps per block, to turn a step into seconds per block")
    p.add_argument("--compiled", action="store_true", help="also time the step through torch.compile")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "step_floor.json"))
    args = p.parse_args()

    import torch

    from hf_autoround.models import bundled_float_dir
    from hf_autoround.scheme import QuantScheme
    from hf_autoround.tuning.allocator import reuse_freed_memory
    from hf_autoround.tuning.signround import wrapped
    from tuning import load_float

    reuse_freed_memory()  # as the tuning driver does: without it every step page-faults its temporaries afresh
    model, tok = load_float(types.SimpleNamespace(float_dir=bundled_float_dir()))
    block, x, kwargs, target = block_inputs(model, tok, args.batch, args.seqlen)
    scheme = QuantScheme(bits=4, group_size=128, sym=True)
    params = tunable_params(block, scheme)
    ordered = list(params.values())
    parts = {"matrix products (18)": products_fn(block, args.batch * args.seqlen),
             "attention fwd+bwd": attention_fn(block, args.batch, args.seqlen),
             "fake-quantiser fwd+bwd (7 weights)": fakequant_fn(block, scheme, ordered)}
    with wrapped(block, dict.fromkeys(LINEARS, scheme), params):
        steps = {"step, eager": step_fn(block, x, kwargs, target, compiled=False)}
        if args.compiled:
            steps["step, torch.compile"] = step_fn(block, x, kwargs, target, compiled=True)
        samples = interleaved(steps, parts, ordered, args.rounds)
    med = {name: statistics.median(v) for name, v in samples.items()}
    report(args, med, samples, torch)


def report(args, med: dict, samples: dict, torch) -> None:
    eager = med["step, eager"]
    floor = med["matrix products (18)"] + med["attention fwd+bwd"]
    print(f"SmolLM2-135M block 0, W4G128 sym, {args.batch} x {args.seqlen} tokens per step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"{'part':38s} {'ms':>8s} {'of eager step':>14s} {'s per block at iters ' + str(args.iters):>24s}")
    for name, ms in med.items():
        print(f"{name:38s} {ms:8.1f} {ms / eager:13.0%} {ms * args.iters / 1e3:24.1f}")
    print(f"{'floor: products + attention':38s} {floor:8.1f} {floor / eager:13.0%} {floor * args.iters / 1e3:24.1f}")
    print(f"eager step / floor: x{eager / floor:.2f}")
    write_json(args.json, {"args": vars(args), "median_ms": med, "samples_ms": samples, "floor_ms": floor})


if __name__ == "__main__":
    main()
