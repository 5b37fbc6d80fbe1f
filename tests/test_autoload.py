"""The .pth autoload: a fresh interpreter loads our checkpoints with no import of hf_autoround, stays cheap at
start-up, and can be switched off."""
import json
import os
import subprocess
import sys

import pytest

from conftest import build_tiny_model
from helpers import quantize_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site_has_pth() -> bool:
    import site

    dirs = site.getsitepackages() + [site.getusersitepackages()]
    return any(os.path.isfile(os.path.join(d, "hf_autoround-autoload.pth")) for d in dirs)


pytestmark = pytest.mark.skipif(not _site_has_pth(), reason="package not installed (pip install .)")


def _run(code: str, **env_changes) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, **env_changes)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoload")
    build_tiny_model("llama").save_pretrained(root / "f")
    quantize_dir(root / "f", root / "q", bits=4, group_size=32)
    return str(root / "q")


def test_fresh_interpreter_loads_without_importing_us(quantized_dir):
    code = (
        "import sys, json\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({quantized_dir!r})\n"
        "print(json.dumps([type(m.model.layers[0].mlp.up_proj).__name__, type(m.hf_quantizer).__module__]))\n"
    )
    layer_type, quantizer_module = json.loads(_run(code))
    assert layer_type == "QuantLinear" and quantizer_module == "hf_autoround.quantizer"


def test_startup_imports_only_the_tiny_autoload_module():
    code = ("import sys, json; print(json.dumps([sorted(sys.modules), "
            "[type(f).__module__ for f in sys.meta_path]]))")
    modules, finders = json.loads(_run(code))
    assert "hf_autoround_autoload" in modules and "hf_autoround_autoload" in finders
    assert not [m for m in modules if m.split(".")[0] in ("torch", "transformers", "hf_autoround", "numpy")]
    _, finders_off = json.loads(_run(code, HF_AUTOROUND_AUTOLOAD="0"))
    assert "hf_autoround_autoload" not in finders_off


def test_switched_off_autoload_leaves_transformers_alone():
    code = ("import json, transformers.quantizers.auto as a, sys\n"
            "print(json.dumps(['hf_autoround' in sys.modules, a.AUTO_QUANTIZER_MAPPING['auto-round'].__module__]))")
    imported, module = json.loads(_run(code, HF_AUTOROUND_AUTOLOAD="0"))
    assert imported is False and module.startswith("transformers.")
    imported, module = json.loads(_run(code))
    assert imported is True and module == "hf_autoround.quantizer"
