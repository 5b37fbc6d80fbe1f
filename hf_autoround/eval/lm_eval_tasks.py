"""lm-eval on local data: task configs shipped in ``eval/tasks`` read JSONL files from a data folder.

The shipped YAMLs are templates (``{data_dir}``); :func:`materialize` writes them with the data folder filled in,
next to ``task_utils.py``, and lm-eval is pointed there with ``include_path``. The model is lm-eval's own ``hf``
model, loading our checkpoint through the transformers registration (no wrapper).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

TEMPLATES = os.path.join(os.path.dirname(__file__), "tasks")
LOCAL_TASKS = ("lambada", "piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande")
DATA_ENV = "HF_AUTOROUND_TASK_DATA"
# where the task JSONL files live in this project's checkouts (shared/data/tasks beside the repository)
_CANDIDATES = ("../shared/data/tasks", "shared/data/tasks",
               os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "tasks"))


def find_data_dir(explicit: str | None = None) -> str | None:
    for path in (explicit, os.environ.get(DATA_ENV), *_CANDIDATES):
        if path and os.path.isfile(os.path.join(path, "piqa.jsonl")):
            return os.path.abspath(path)
    return None


def resolve_tasks(names: str | list[str], data_dir: str | None) -> list[str]:
    """``piqa`` -> ``local_piqa`` when its data is local; other names are left for lm-eval's own registry."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    resolved = []
    for name in names:
        base = name.removeprefix("local_")
        if base in LOCAL_TASKS and data_dir and os.path.isfile(os.path.join(data_dir, base + ".jsonl")):
            resolved.append("local_" + base)
        elif name.startswith("local_"):
            raise ValueError(f"task {name!r}: no {base}.jsonl found; set {DATA_ENV} to the folder holding it")
        else:
            resolved.append(name)
    return resolved


def materialize(data_dir: str, out_dir: str) -> str:
    """Write the task YAMLs for ``data_dir`` into ``out_dir``; returns the include path for lm-eval."""
    os.makedirs(out_dir, exist_ok=True)
    for name in LOCAL_TASKS:
        with open(os.path.join(TEMPLATES, f"local_{name}.yaml"), encoding="utf-8") as f:
            text = f.read().format(data_dir=data_dir)
        with open(os.path.join(out_dir, f"local_{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(text)
    shutil.copy(os.path.join(TEMPLATES, "task_utils.py"), out_dir)
    return out_dir


def evaluate(pretrained, tasks, batch_size: int = 8, limit: int | None = None, data_dir: str | None = None,
             dtype: str = "float32", tokenizer=None) -> dict:
    """Run lm-eval's ``hf`` model on ``pretrained`` (a checkpoint folder, or an in-memory model with its
    ``tokenizer``); returns {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data_dir = find_data_dir(data_dir)
    resolved = resolve_tasks(tasks, data_dir)
    with tempfile.TemporaryDirectory(prefix="hfar_tasks_") as tmp:
        manager = TaskManager(include_path=materialize(data_dir, tmp) if data_dir else None)
        if isinstance(pretrained, str):
            model, model_args = "hf", f"pretrained={pretrained},dtype={dtype}"
        else:
            from lm_eval.models.huggingface import HFLM

            model, model_args = HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size), None
        out = simple_evaluate(model=model, model_args=model_args, tasks=resolved, task_manager=manager,
                              batch_size=batch_size, limit=limit, device="cpu")
    return summarize(out["results"])


def summarize(results: dict) -> dict:
    """Keep the headline metrics: ``acc,none`` -> ``acc``; drop stderr entries and aliases."""
    table = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and name not in ("alias", "sample_len"):
                row[name] = float(value)
        table[task.removeprefix("local_")] = row
    return table


def headline(row: dict) -> tuple[str, float]:
    """The one number per task shown in tables: acc_norm where it exists (as the reference model cards do)."""
    for metric in ("acc_norm", "acc", "perplexity"):
        if metric in row:
            return metric, row[metric]
    name = next(iter(row))
    return name, row[name]
