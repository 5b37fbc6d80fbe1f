import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_autoround import AutoRoundConfig
from hf_autoround.guards import NonFiniteError, weight_problem
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.quantize import quantize_model
from hf_autoround.scheme import QuantScheme

from conftest import build_tiny_model


def _poisoned(value):
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e7])
def test_bad_weights_stop_quantisation_naming_the_layer(value):
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.up_proj"):
        quantize_model(_poisoned(value), AutoRoundConfig(iters=0, group_size=32), progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nan_weights_stop_even_under_keep_float(value):
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        quantize_model(_poisoned(value), AutoRoundConfig(iters=0, group_size=32), progress=False,
                       on_nonfinite="keep_float")


def test_keep_float_policy_leaves_an_overflowing_layer_float(tmp_path):
    model = _poisoned(1e7)
    config = AutoRoundConfig(iters=0, group_size=32)
    plan = quantize_model(model, config, progress=False, on_nonfinite="keep_float")
    assert "model.layers.1.mlp.up_proj" in plan.kept_float
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for module in reloaded.modules():
        if isinstance(module, QuantLinear):
            assert torch.isfinite(module.scales.float()).all()
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_fp16_scale_overflow_is_detected():
    w = torch.zeros(4, 32)
    w[0, 0] = 1e6  # / 8 > 65504
    assert "overflow" in weight_problem(w, QuantScheme(4, 32, True))
    assert weight_problem(torch.randn(4, 32), QuantScheme(4, 32, True)) is None


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite='skip'"):
        quantize_model(build_tiny_model("llama"), AutoRoundConfig(iters=0), progress=False, on_nonfinite="skip")
