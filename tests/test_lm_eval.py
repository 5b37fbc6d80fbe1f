"""lm-eval's own ``hf`` model loads our checkpoints with no wrapper and no import of hf_autoround."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from conftest import DATA, FIXTURES
from helpers import quantize_dir
from test_autoload import ROOT, _site_has_pth

pytestmark = pytest.mark.skipif(not (_site_has_pth() and os.path.isdir(FIXTURES)),
                                reason="needs the installed package and ../shared/fixtures")

TASK_YAML = """task: tiny_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

SCRIPT = """
import json, sys, torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
lm = HFLM(pretrained=sys.argv[1], batch_size=2, device="cpu")
layer = lm.model.model.layers[0].mlp.up_proj
res = simple_evaluate(model=lm, tasks=["tiny_lambada"], task_manager=TaskManager(include_path=sys.argv[2]))
ctx, cont = "The quick brown fox jumps over the", " lazy dog"
(lm_ll, _), = lm._loglikelihood_tokens([((ctx, cont), lm.tok_encode(ctx), lm.tok_encode(cont))])
ids = torch.tensor([lm.tok_encode(ctx) + lm.tok_encode(cont)])
with torch.no_grad():
    logp = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), -1)
n = len(lm.tok_encode(cont))
direct = logp[-n:].gather(1, ids[0, -n:, None]).sum().item()
print(json.dumps({"layer": type(layer).__name__, "acc": res["results"]["tiny_lambada"]["acc,none"],
                  "lm_eval_ll": lm_ll, "direct_ll": direct, "imported_us": "hf_autoround.quantizer" in sys.modules}))
"""


def test_lm_eval_hf_model_reads_our_checkpoint(tmp_path):
    out = tmp_path / "q"
    quantize_dir(os.path.join(FIXTURES, "float"), out, bits=4, group_size=128)
    AutoTokenizer.from_pretrained(os.path.join(FIXTURES, "float")).save_pretrained(out)
    with open(os.path.join(DATA, "tasks", "lambada.jsonl")) as src, open(tmp_path / "ten.jsonl", "w") as dst:
        dst.writelines(line for _, line in zip(range(10), src))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_lambada.yaml").write_text(TASK_YAML.format(data=tmp_path / "ten.jsonl"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(tmp_path / "tasks")], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, HF_DATASETS_OFFLINE="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layer"] == "QuantLinear" and result["imported_us"] is True
    assert 0.0 <= result["acc"] <= 1.0
    assert abs(result["lm_eval_ll"] - result["direct_ll"]) < 1e-3 * max(1.0, abs(result["direct_ll"]))
