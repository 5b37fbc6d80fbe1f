"""transformers' own GPTQ and AWQ paths (backed by ``gptqmodel``) as consumers of our auto_gptq / auto_awq exports.

gptqmodel 7.6.0 is the release that installs beside torch 2.13; it (and ``optimum``, which transformers' GPTQ path
imports) live in their own venv, so this script runs in two steps:

    # 1. with the project's python: quantise the fixture Llama (RTN, W4 g128), export, save our logits
    .venv/bin/python benchmarks/interop/gptqmodel_logits.py prepare --out /tmp/interop
    # 2. with a python that has gptqmodel + optimum (and this project's torch/transformers): load each export
    #    with plain from_pretrained (no quantization_config: transformers picks its GPTQ / AWQ quantizer)
    /tmp/gptqvenv/bin/python benchmarks/interop/gptqmodel_logits.py consume --out /tmp/interop

Prints relative logits error and top-1 agreement against our in-memory model and writes JSON. No asserts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ (bench_io)
from bench_io import write_json  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "fixtures")
CASES = (("auto_gptq", True), ("auto_awq", False), ("auto_awq", True))


def prepare(out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_autoround import AutoRoundConfig
    from hf_autoround.backends import attach_kernels
    from hf_autoround.export import export_model
    from hf_autoround.quantize import quantize_model

    float_dir = os.path.join(FIXTURES, "float")
    ids = torch.load(os.path.join(FIXTURES, "expected_logits.pt"), weights_only=True)["input_ids"]
    logits = {}
    for fmt, sym in CASES:
        model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
        quantize_model(model, AutoRoundConfig(bits=4, group_size=128, sym=sym, iters=0), progress=False)
        attach_kernels(model, forced="torch")  # fp32 reference arithmetic
        name = f"{fmt}-{'sym' if sym else 'asym'}"
        target = os.path.join(out, name)
        shutil.rmtree(target, ignore_errors=True)
        export_model(model, AutoTokenizer.from_pretrained(float_dir), target, fmt)
        with torch.no_grad():
            logits[name] = model(ids).logits
    torch.save({"input_ids": ids, "logits": logits}, os.path.join(out, "ours.pt"))
    print(f"wrote {sorted(logits)} to {out}")


def consume(out: str) -> None:
    from transformers import AutoModelForCausalLM

    saved = torch.load(os.path.join(out, "ours.pt"), weights_only=True)
    rows = []
    for name, ours in saved["logits"].items():
        row = {"checkpoint": name}
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), device_map="cpu",
                                                         dtype=torch.float16).eval()
            row["layer_class"] = type(model.model.layers[0].self_attn.q_proj).__name__
            with torch.no_grad():
                theirs = model(saved["input_ids"]).logits.float()
            row["rel_err"] = ((theirs - ours).norm() / ours.norm()).item()
            row["top1"] = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
        except Exception as err:  # report and go on: one consumer failing must not hide the others
            traceback.print_exc(limit=3)
            row["error"] = repr(err)[:300]
        rows.append(row)
        print(row, flush=True)
    write_json(os.path.join(out, "gptqmodel_logits.json"), rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("prepare", "consume"))
    parser.add_argument("--out", default="/tmp/interop")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    (prepare if args.step == "prepare" else consume)(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
