"""Tuning options: the config's serialisable settings plus the run-time keyword arguments of ``quantize()``."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

from .bf16_matmul import MatmulPrecision, bf16_speed
from .signround import SignRoundSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# accepted for compatibility with the seed's API; they change nothing on a CPU-only run (``device`` is checked; a
# model dispatched with a ``device_map`` is recognised by its accelerate hooks, see ``offload``)
_NO_OP_KWARGS = ("low_gpu_mem_usage", "device", "device_map")


@dataclass
class TuningOptions:
    signround: SignRoundSettings
    nsamples: int = 128
    seqlen: int = 2048
    resume_dir: str | None = None  # resume=True: where finished blocks are checkpointed (see ``resume``)
    low_cpu_mem_usage: bool = False  # blocks read from the checkpoint files one at a time (see ``lazy_blocks``)
    enable_quanted_input: bool = True
    nblocks: int = 1  # consecutive blocks tuned together, one loss at the last one's output (block_group)
    disable_opt_rtn: bool = False
    # start SignRound's min/max scales from the optimised-RTN search (on by default: SmolLM2-135M W4G128, 4 blocks,
    # iters 50, seeds 42/7/1: perplexity gap to float 0.572/0.793/0.948 from the plain start, 0.555/0.502/0.767
    # from this one; benchmarks/results/tuning_w4g128_blocks4_3seeds*.txt)
    init_opt_rtn: bool = True
    channel_scaling: bool = True  # activation-aware channel scales folded into the norms first (channel_scaling)
    cache_dtype: torch.dtype | None = None  # hidden states between passes; None: bf16 for a float32 model (driver)
    report: object = None  # a TuningReport to fill in (else a new one is returned)
    gguf: object = None  # a GgufTuning: tune on a GGUF file's grids instead of the integer scheme
    ignored: dict = field(default_factory=dict)

    @property
    def wants_opt_rtn(self) -> bool:
        """Whether blocks need the optimised-RTN range search (iters 0 with data, or as SignRound's start; never
        on a GGUF grid, whose own search fixes the scales)."""
        if self.gguf is not None:
            return False
        if self.signround.iters == 0:
            return not self.disable_opt_rtn
        return self.init_opt_rtn

    @property
    def scales_channels(self) -> bool:
        """Whether blocks get activation-aware channel scaling before their layers are tuned or rounded: with
        calibration data (SignRound or optimised RTN), never on a GGUF grid (its scales come from the file's
        own search)."""
        if not self.channel_scaling or self.gguf is not None:
            return False
        return self.signround.iters > 0 or not self.disable_opt_rtn

    def block_settings(self, block_index: int) -> SignRoundSettings:
        return replace(self.signround, seed=self.signround.seed + block_index)

    @classmethod
    def from_config(cls, config, **kwargs) -> "TuningOptions":
        kwargs = dict(kwargs)
        check_device(kwargs.get("device"))
        ignored = {k: kwargs.pop(k) for k in _NO_OP_KWARGS if k in kwargs}
        resume_dir = _resume_dir(kwargs.pop("resume", False), kwargs.pop("resume_dir", None))
        low_cpu_mem_usage = bool(kwargs.pop("low_cpu_mem_usage", False))
        nblocks = _positive_int("nblocks", kwargs.pop("nblocks", 1))
        if nblocks > 1 and resume_dir:
            raise ValueError(f"nblocks={nblocks} with resume=True: a run resumes block by block; use nblocks=1")
        signround = SignRoundSettings(
            iters=config.iters, lr=config.lr, minmax_lr=config.minmax_lr, batch_size=config.batch_size,
            gradient_accumulate_steps=_positive_int("gradient_accumulate_steps",
                                                    kwargs.pop("gradient_accumulate_steps", 1)),
            enable_minmax_tuning=bool(kwargs.pop("enable_minmax_tuning", True)),
            seed=config.seed, amp=bool(kwargs.pop("amp", False)),
            bf16=MatmulPrecision(
                forward=_auto_bf16("bf16_forward", kwargs.pop("bf16_forward", "auto"), tunes=config.iters > 0),
                backward=_auto_bf16("bf16_backward", kwargs.pop("bf16_backward", "auto"), tunes=config.iters > 0)),
            loss=kwargs.pop("loss", SignRoundSettings.loss),
            momentum=kwargs.pop("momentum", SignRoundSettings.momentum),
            compile=_flag("enable_torch_compile", kwargs.pop("enable_torch_compile", False)),
            chunk_tokens=kwargs.pop("chunk_tokens", SignRoundSettings.chunk_tokens),
        )
        options = cls(
            signround=signround, nsamples=config.nsamples, seqlen=config.seqlen,
            enable_quanted_input=bool(kwargs.pop("enable_quanted_input", True)),
            disable_opt_rtn=bool(kwargs.pop("disable_opt_rtn", False)),
            init_opt_rtn=bool(kwargs.pop("init_opt_rtn", True)),
            channel_scaling=_flag("channel_scaling", kwargs.pop("channel_scaling", True)),
            cache_dtype=_dtype(kwargs.pop("cache_dtype", None)),
            report=kwargs.pop("report", None), gguf=kwargs.pop("gguf", None), ignored=ignored,
        )
        if kwargs:
            raise TypeError(f"unknown tuning arguments: {sorted(kwargs)}")
        options.resume_dir, options.low_cpu_mem_usage, options.nblocks = resume_dir, low_cpu_mem_usage, nblocks
        return options


def _resume_dir(resume, resume_dir) -> str | None:
    if not isinstance(resume, bool):
        raise ValueError(f"resume={resume!r} must be True or False")
    if resume_dir is not None and not isinstance(resume_dir, (str, os.PathLike)):
        raise ValueError(f"resume_dir={resume_dir!r} must be a directory path")
    if resume and not resume_dir:
        raise ValueError("resume=True needs resume_dir=<directory> (AutoRound.quantize_and_save and the CLI "
                         "default it to '<output_dir>.resume')")
    if resume_dir and not resume:
        raise ValueError(f"resume_dir={resume_dir!r} is given but resume=False; pass resume=True to checkpoint "
                         f"and resume there")
    return os.fspath(resume_dir) if resume else None


def check_device(device) -> None:
    """``device``: None, "auto", "cpu", or a CUDA/XPU device name; this build tunes on the CPU, so an accelerator
    that is not there is an error and one that is there is only reported."""
    if device is None or str(device) in ("auto", "cpu"):
        return
    name = str(device)
    kind = name.split(":")[0]
    if kind not in ("cuda", "xpu", "mps", "hpu"):
        raise ValueError(f"device={device!r}: expected 'cpu', 'auto' or an accelerator such as 'cuda:0'")
    backend = getattr(torch, kind, None)
    if backend is None or not backend.is_available():
        raise ValueError(f"device={device!r}: no {kind} device is available on this machine; use device='cpu'")
    logger.warning("device=%r: this build tunes on the CPU; the model stays where it is", device)


def _auto_bf16(name: str, value, tunes: bool) -> bool:
    """"auto": on where a bf16 product measured faster than a float32 one on this CPU, timed only when SignRound
    runs (``tunes``; iters 0 runs no tuned product); True / False force it."""
    if value == "auto":
        return tunes and bf16_speed().faster
    return _flag(name, value, "'auto', True or False")


def _flag(name, value, expected: str = "True or False") -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return value


def _positive_int(name, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def _dtype(value):
    if value is None or isinstance(value, torch.dtype):
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"cache_dtype={value!r}: expected one of {sorted(_DTYPES)} or a torch.dtype")
