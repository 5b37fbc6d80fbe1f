"""Tuning options: the config's serialisable settings plus the run-time keyword arguments of ``quantize()``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from .signround import SignRoundSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# accepted for compatibility with the seed's API; they change nothing on a CPU-only run
_NO_OP_KWARGS = ("low_gpu_mem_usage", "enable_torch_compile", "device", "device_map", "low_cpu_mem_usage")


@dataclass
class TuningOptions:
    signround: SignRoundSettings
    nsamples: int = 128
    seqlen: int = 2048
    enable_quanted_input: bool = True
    disable_opt_rtn: bool = False
    init_opt_rtn: bool = False  # start SignRound's min/max scales from the optimised-RTN search
    cache_dtype: torch.dtype | None = None  # None: the model's dtype
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

    def block_settings(self, block_index: int) -> SignRoundSettings:
        return replace(self.signround, seed=self.signround.seed + block_index)

    @classmethod
    def from_config(cls, config, **kwargs) -> "TuningOptions":
        kwargs = dict(kwargs)
        ignored = {k: kwargs.pop(k) for k in _NO_OP_KWARGS if k in kwargs}
        nblocks = kwargs.pop("nblocks", 1)
        if nblocks != 1:
            raise ValueError(f"nblocks={nblocks!r}: only nblocks=1 (one block at a time) is implemented")
        signround = SignRoundSettings(
            iters=config.iters, lr=config.lr, minmax_lr=config.minmax_lr, batch_size=config.batch_size,
            gradient_accumulate_steps=_positive_int("gradient_accumulate_steps",
                                                    kwargs.pop("gradient_accumulate_steps", 1)),
            enable_minmax_tuning=bool(kwargs.pop("enable_minmax_tuning", True)),
            seed=config.seed, amp=bool(kwargs.pop("amp", False)),
        )
        options = cls(
            signround=signround, nsamples=config.nsamples, seqlen=config.seqlen,
            enable_quanted_input=bool(kwargs.pop("enable_quanted_input", True)),
            disable_opt_rtn=bool(kwargs.pop("disable_opt_rtn", False)),
            init_opt_rtn=bool(kwargs.pop("init_opt_rtn", False)),
            cache_dtype=_dtype(kwargs.pop("cache_dtype", None)),
            report=kwargs.pop("report", None), gguf=kwargs.pop("gguf", None), ignored=ignored,
        )
        if kwargs:
            raise TypeError(f"unknown tuning arguments: {sorted(kwargs)}")
        return options


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
