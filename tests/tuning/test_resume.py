"""Resumable tuning: a run SIGKILLed at any point and resumed writes byte for byte the checkpoint of an
uninterrupted run; a resume directory of another run is refused, naming what differs.

The killed runs are forked children of the test process (no second interpreter start-up): each arms one kill
point, runs ``AutoRound(..., resume=True).quantize_and_save``, and is killed by SIGKILL, from inside at an exact
point or from outside at whatever instant the parent sees the manifest advance.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from conftest import FIXTURES, tiny_config
from tuning_helpers import calib, one_thread  # noqa: F401  (autouse)

from hf_autoround import AutoRound
from hf_autoround.tuning import driver
from hf_autoround.tuning.resume import MANIFEST, ResumeMismatch, ResumeState

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed runs are forked children")


def llama3(seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 3
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()



def tuner(model=None, **kw) -> AutoRound:
    # 2 bits and a large lr: every block's kept step is a tuned one, so a block tuned on wrong inputs differs
    base = dict(bits=2, group_size=32, iters=8, lr=0.05, nsamples=8, seqlen=24, batch_size=4, dataset=calib(),
                progress=False)
    base.update(kw)
    return AutoRound(model if model is not None else llama3(), None, **base)


def files(directory) -> dict:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint of an uninterrupted run without resume."""
    out = tmp_path_factory.mktemp("reference") / "ckpt"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ar = tuner()
    ar.quantize_and_save(str(out))
    torch.set_num_threads(before)
    assert all(b.best_iter > 0 for b in ar.report.blocks)  # the inputs matter (see tuner)
    return files(out)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill_point: str) -> None:
    """In the child: make it SIGKILL itself at ``kill_point``."""
    from hf_autoround import export
    from hf_autoround.export import gptq_awq
    from hf_autoround.tuning import signround

    if kill_point == "after block 0 is committed":
        record = ResumeState.record_block

        def after(self, container, index, *args):
            record(self, container, index, *args)
            if index == 0:
                _die()

        ResumeState.record_block = after
    elif kill_point == "mid-block, at the third tuning step":
        step, calls = signround._step, []

        def third(*args):
            calls.append(1)
            if len(calls) == 3:
                _die()
            return step(*args)

        signround._step = third
    elif kill_point == "manifest written, not yet renamed into place":
        replace = os.replace

        def before_commit(src, dst):
            if os.path.basename(dst) == MANIFEST:
                _die()
            return replace(src, dst)

        os.replace = before_commit
    elif kill_point == "after the last block, before the save":
        export.export_model = lambda *args, **kwargs: _die()
    elif kill_point == "halfway through writing the checkpoint":
        def half(state, directory, *args):
            with open(os.path.join(directory, "model.safetensors"), "wb") as f:
                f.write(b"half a file")
            _die()

        gptq_awq.save_safetensors = half
    else:
        raise ValueError(kill_point)


def fork_killed(work, kill_when=None, timeout: float = 120) -> None:
    """Run ``work()`` in a forked child that must die by SIGKILL: from inside (an armed kill point), or from here
    as soon as ``kill_when()`` is true. One torch thread: a forked child of a process with a running OpenMP pool
    can hang in its first parallel region."""
    assert torch.get_num_threads() == 1
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            work()
        finally:
            os._exit(3)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if kill_when is not None and kill_when():
            os.kill(pid, signal.SIGKILL)
            kill_when = None
        time.sleep(0.002)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the child did not die within {timeout} s")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def run_killed(out, kill_point: str | None = None, outside_after: int | None = None) -> None:
    """A resumable run into ``out`` killed at ``kill_point``, or from outside once the manifest shows
    ``outside_after`` finished blocks."""
    def work():
        if kill_point:
            _arm(kill_point)
        else:
            from hf_autoround.tuning import signround

            step = signround._step
            signround._step = lambda *a: (time.sleep(0.01), step(*a))  # room for the parent's kill
        tuner(resume=True).quantize_and_save(str(out))

    fork_killed(work, None if outside_after is None else lambda: finished(out) >= outside_after)


def finished(out) -> int:
    try:
        with open(f"{out}.resume/{MANIFEST}", encoding="utf-8") as f:
            return sum(len(c["blocks"]) for c in json.load(f)["containers"].values())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def resume_to_the_end(out, monkeypatch) -> int:
    """Resume in this process; returns how many blocks it tuned."""
    tuned = []
    process = driver._process_block
    monkeypatch.setattr(driver, "_process_block", lambda *a, **k: (tuned.append(a[2]), process(*a, **k))[1])
    tuner(resume=True).quantize_and_save(str(out))
    return len(tuned)


def test_killed_five_times_resumes_to_the_identical_checkpoint(tmp_path, reference, monkeypatch):
    out = tmp_path / "ckpt"
    chain = [("after block 0 is committed", 1), ("mid-block, at the third tuning step", 1),
             ("manifest written, not yet renamed into place", 1), ("after the last block, before the save", 3),
             ("halfway through writing the checkpoint", 3)]
    for kill_point, done in chain:
        run_killed(out, kill_point)
        assert finished(out) == done, kill_point
        assert not out.exists(), kill_point  # the checkpoint directory only ever appears whole
    assert resume_to_the_end(out, monkeypatch) == 0  # every block came from the resume directory
    assert files(out) == reference
    assert not os.path.exists(f"{out}.resume")  # deleted after the successful save


def test_killed_from_outside_at_any_instant(tmp_path, reference, monkeypatch):
    out = tmp_path / "ckpt"
    run_killed(out, outside_after=1)
    done = finished(out)
    assert 1 <= done <= 3
    assert resume_to_the_end(out, monkeypatch) == 3 - done
    assert files(out) == reference


class _Interrupt(Exception):
    pass


def interrupted_run(resume_dir, model=None, **kw) -> None:
    """A resumable run stopped (in-process) right after block 0 was committed."""
    record = ResumeState.record_block

    def stop(self, container, index, *args):
        record(self, container, index, *args)
        raise _Interrupt

    ResumeState.record_block = stop
    try:
        with pytest.raises(_Interrupt):
            tuner(model, resume=True, resume_dir=str(resume_dir), **kw).quantize()
    finally:
        ResumeState.record_block = record


@pytest.mark.parametrize("change,needle", [
    (dict(iters=5), "setting signround"),
    (dict(group_size=64), "setting layers"),
    (dict(dataset=[torch.arange(1, 25)] * 8), "calibration data"),
    (dict(model_seed=1), "inputs of the first block"),
    (dict(block0_changed=True), "float weights of model.layers.0"),
])
def test_another_runs_directory_is_refused_naming_the_difference(tmp_path, change, needle):
    interrupted_run(tmp_path / "r")
    model = llama3(change.pop("model_seed", 0))
    if change.pop("block0_changed", False):
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(ResumeMismatch, match=needle) as err:
        tuner(model, resume=True, resume_dir=str(tmp_path / "r"), **change).quantize()
    assert "Delete" in str(err.value) or "delete" in str(err.value)


def test_resume_arguments_are_checked():
    with pytest.raises(ValueError, match="resume=True needs resume_dir"):
        tuner(resume=True).quantize()
    with pytest.raises(ValueError, match="resume=False"):
        tuner(resume_dir="/tmp/x").quantize()


@pytest.mark.skipif(not os.path.isdir(FIXTURES), reason="../shared/fixtures not present")
def test_killed_low_memory_cli_run_resumes_to_the_plain_runs_tensors(tmp_path):
    """CLI --resume --low_cpu_mem_usage, SIGKILLed after block 0 and run again: the tensors and config files of a
    plain run (the low-memory writer lays the file out differently, so tensors are compared, not bytes)."""
    from safetensors.torch import load_file

    from hf_autoround.cli import main

    def argv(out, *extra):
        return ["--model", os.path.join(FIXTURES, "float"), "--bits", "2", "--group_size", "64", "--iters", "4",
                "--lr", "0.05", "--nsamples", "4", "--seqlen", "32", "--batch_size", "2", "--output_dir", str(out),
                "--disable_eval", "--quiet", *extra]

    main(argv(tmp_path / "plain"))
    scaled = argv(tmp_path / "scaled", "--resume", "--low_cpu_mem_usage")

    def work():
        _arm("after block 0 is committed")
        main(scaled)

    fork_killed(work)
    assert finished(tmp_path / "scaled") == 1
    main(scaled)
    assert not (tmp_path / "scaled.resume").exists()
    plain, resumed = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "scaled"))
    assert plain.keys() == resumed.keys() and all(torch.equal(plain[k], resumed[k]) for k in plain)
    for name in ("config.json", "quantization_config.json", "tokenizer.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "scaled" / name).read_bytes()
