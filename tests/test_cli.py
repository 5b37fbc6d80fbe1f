"""The command line: every flag parses, bad values are refused before any model loads, and a run end to end
writes the checkpoint, the evaluation table and the quality report with the numbers it printed."""
import json
import os

import pytest

from hf_autoround.cli import main, parse_args

from conftest import FIXTURES


def test_every_flag_parses(tmp_path):
    layer_file = tmp_path / "layers.json"
    layer_file.write_text(json.dumps({"mlp.down_proj": {"bits": 8}}))
    args, config = parse_args([
        "--model", "some/dir", "--bits", "2", "--group_size", "64", "--asym", "--iters", "10", "--nsamples", "16",
        "--seqlen", "128", "--batch_size", "4", "--lr", "0.01", "--minmax_lr", "0.02", "--dataset", "a.txt:num=4",
        "--layer_config", str(layer_file), "--fp_layers", "o_proj,q_proj", "--quant_lm_head",
        "--format", "auto_round,auto_gptq", "--output_dir", str(tmp_path / "o"), "--device", "cpu",
        "--model_dtype", "bfloat16", "--seed", "7", "--tasks", "piqa", "--eval_bs", "2", "--eval_limit", "5",
        "--eval_tokens", "1024", "--verbose"])
    assert (config.bits, config.group_size, config.sym, config.iters) == (2, 64, False, 10)
    assert (config.nsamples, config.seqlen, config.batch_size, config.lr, config.minmax_lr) == (16, 128, 4, 0.01, 0.02)
    assert config.seed == 7 and config.quant_lm_head is True
    assert config.extra_config == {"mlp.down_proj": {"bits": 8}, "o_proj": {"bits": 16}, "q_proj": {"bits": 16}}
    assert args.dataset == "a.txt:num=4" and args.model_dtype == "bfloat16" and args.eval_limit == 5


@pytest.mark.parametrize("recipe,iters,nsamples", [("default", 200, 128), ("best", 1000, 512), ("light", 50, 128),
                                                   ("rtn", 0, 128)])
def test_recipes(recipe, iters, nsamples):
    _, config = parse_args(["--recipe", recipe])
    assert (config.iters, config.nsamples) == (iters, nsamples)
    if recipe == "light":
        assert config.lr == 5e-3


def test_explicit_flags_beat_the_recipe():
    _, config = parse_args(["--recipe", "best", "--iters", "3"])
    assert config.iters == 3 and config.nsamples == 512


@pytest.mark.parametrize("argv,needle", [
    (["--bits", "5"], "bits=5"),
    (["--group_size", "0"], "group_size=0"),
    (["--iters", "-1"], "iters=-1"),
    (["--format", "zip"], "format='zip'"),
    (["--layer_config", "{not json"], "--layer_config is not valid JSON"),
    (["--layer_config", '{"mlp": {"bits": 7}}'], "extra_config['mlp']['bits']=7"),
    (["--recipe", "fastest"], "invalid choice"),
    (["--model_dtype", "int8"], "invalid choice"),
    (["--sym", "--asym"], "not allowed with"),
])
def test_bad_values_are_refused_before_loading(argv, needle, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2
    assert needle in capsys.readouterr().err


def test_non_empty_output_dir_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["--model", "/nonexistent/model", "--output_dir", str(tmp_path), "--recipe", "rtn"])
    assert "exists and is not empty" in capsys.readouterr().err


def test_format_that_cannot_hold_the_scheme_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--bits", "2", "--format", "auto_awq"])
    assert "auto_awq" in capsys.readouterr().err


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--bits", "--group_size", "--asym", "--iters", "--format", "--eval", "--tasks", "--recipe"):
        assert flag in text
    assert "(default: 128)" in text


@pytest.mark.skipif(not os.path.isdir(FIXTURES), reason="../shared/fixtures not present")
def test_end_to_end_with_eval_writes_what_it_printed(tmp_path, capsys):
    out = tmp_path / "q"
    main(["--model", os.path.join(FIXTURES, "float"), "--bits", "4", "--group_size", "128", "--iters", "2",
          "--nsamples", "4", "--seqlen", "32", "--batch_size", "2", "--output_dir", str(out), "--tasks", "piqa",
          "--eval_limit", "10", "--eval_bs", "4", "--eval_tokens", "1024", "--quiet"])
    printed = capsys.readouterr().out
    saved = json.load(open(out / "eval.json"))
    assert saved["columns"] == ["float", "W4 g128 sym"]
    for row, values in saved["rows"].items():
        assert row in printed
        for value in values.values():
            assert (f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}") in printed
    assert "piqa acc_norm" in saved["rows"]
    report = json.load(open(out / "quality_report.json"))
    assert len(report["blocks"]) == 2 and report["blocks"][0]["loss_before"] > 0
    assert report["layers"]["model.layers.0.mlp.up_proj"]["backend"]
    assert all(v["loss_rtn"] > 0 and v["loss_tuned"] > 0 for v in report["layers"].values())
    assert os.path.getsize(out / "quality_report.png") > 1000
    assert "quality_report.png" in (out / "eval.md").read_text()
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer.json")


def test_resume_low_memory_and_device_flags_parse_and_are_checked(tmp_path, capsys):
    args, _ = parse_args(["--resume", "--resume_dir", str(tmp_path / "r"), "--low_cpu_mem_usage"])
    assert args.resume and args.resume_dir == str(tmp_path / "r") and args.low_cpu_mem_usage
    args, _ = parse_args([])
    assert not args.resume and args.resume_dir is None and not args.low_cpu_mem_usage
    with pytest.raises(SystemExit):
        parse_args(["--resume_dir", str(tmp_path / "r")])
    assert "--resume_dir is given without --resume" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda"])
        assert "device='cuda': no cuda device is available" in capsys.readouterr().err



def test_nblocks_flag_reaches_the_tuning_arguments(tmp_path):
    from hf_autoround.job import _tuning_kwargs

    args, _ = parse_args(["--nblocks", "2"])
    assert args.nblocks == 2 and _tuning_kwargs(args) == {"nblocks": 2}
    args, _ = parse_args(["--resume", "--resume_dir", str(tmp_path / "r")])
    assert "nblocks" not in _tuning_kwargs(args)  # the default (1) is not passed


def test_loss_flag_reaches_the_tuning_arguments():
    from hf_autoround.job import _tuning_kwargs

    assert _tuning_kwargs(parse_args(["--loss", "mse"])[0]) == {"loss": "mse"}
    assert "loss" not in _tuning_kwargs(parse_args([])[0])  # the settings' default applies
    with pytest.raises(SystemExit):
        parse_args(["--loss", "l1"])


def test_momentum_flag_reaches_the_tuning_arguments():
    from hf_autoround.job import _tuning_kwargs

    assert _tuning_kwargs(parse_args(["--momentum", "0.5"])[0]) == {"momentum": 0.5}
    assert "momentum" not in _tuning_kwargs(parse_args([])[0])  # the settings' default applies


def test_disable_channel_scaling_flag_reaches_the_tuning_arguments():
    from hf_autoround.job import _tuning_kwargs

    assert _tuning_kwargs(parse_args(["--disable_channel_scaling"])[0]) == {"channel_scaling": False}
    assert "channel_scaling" not in _tuning_kwargs(parse_args([])[0])  # on by default


def test_enable_torch_compile_flag_reaches_the_tuning_arguments():
    from hf_autoround.job import _tuning_kwargs

    assert _tuning_kwargs(parse_args(["--enable_torch_compile"])[0]) == {"enable_torch_compile": True}
    assert "enable_torch_compile" not in _tuning_kwargs(parse_args([])[0])  # eager by default
