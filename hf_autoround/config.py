"""``AutoRoundConfig``: the quantisation config users pass to ``from_pretrained`` and that checkpoints store.

It subclasses ``transformers.AutoRoundConfig`` under the same class name, because transformers compares config
classes by name when a checkpoint's config meets one passed by the user (DESIGN.md §2). Every field is validated
on construction. Only serialisable settings live here; tokenizers and datasets are arguments of ``quantize()``.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any

import transformers

from .formats import KNOWN_FORMATS, canonical_format
from .scheme import FLOAT_BITS, STANDARD_GROUP_SIZES, SUPPORTED_BITS, QuantScheme

logger = logging.getLogger(__name__)

DATA_TYPES = ("int",)
RUNTIME_ONLY_KEYS = ("backend",)
# Keys written by the reference library that describe activations or its own bookkeeping; kept, not interpreted.
_IGNORED_ACT_BITS = 16


def _check(field: str, value, ok: bool, allowed: str):
    if not ok:
        raise ValueError(f"AutoRoundConfig: {field}={value!r} is invalid; expected {allowed}")


class AutoRoundConfig(transformers.AutoRoundConfig):
    """Settings of an AutoRound (SignRound) weight-only quantisation.

    Scheme: ``bits`` (2, 3, 4, 8), ``group_size`` (-1 = per output channel, or a positive group length),
    ``sym``, ``data_type`` ("int"), ``packing_format`` (None = chosen from the scheme).
    Layers: ``block_name_to_quantize`` (containers of transformer blocks; auto-detected when None),
    ``extra_config`` (layer name, substring or regex -> ``{"bits", "group_size", "sym"}``; ``bits: 16`` keeps the
    layer in float), ``quant_lm_head``.
    Tuning: ``iters`` (0 = round-to-nearest), ``nsamples``, ``seqlen``, ``batch_size``, ``lr``, ``minmax_lr``,
    ``seed``. Loading: ``backend`` ("auto" or a backend name from ``hf_autoround.backends``).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        backend: str = "auto",
        data_type: str = "int",
        packing_format: str | None = None,
        block_name_to_quantize=None,
        extra_config: dict | None = None,
        quant_lm_head: bool = False,
        iters: int = 200,
        nsamples: int = 128,
        seqlen: int = 2048,
        batch_size: int = 8,
        lr: float | None = None,
        minmax_lr: float | None = None,
        seed: int = 42,
        **kwargs,
    ):
        for key in ("dataset", "tokenizer"):
            if key in kwargs:
                raise ValueError(f"AutoRoundConfig: {key} is not a config field; pass it to model.quantize({key}=...)")
        self.data_type = data_type
        self.block_name_to_quantize = block_name_to_quantize
        self.extra_config = copy.deepcopy(extra_config) if extra_config else {}
        self.quant_lm_head = quant_lm_head
        self.iters = iters
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.batch_size = batch_size
        self.lr = lr
        self.minmax_lr = minmax_lr
        self.seed = seed
        super().__init__(bits=bits, group_size=group_size, sym=sym, backend=backend, **kwargs)
        # the base class sets a packing_format of its own; ours is None until chosen, or what the checkpoint says
        self.packing_format = packing_format
        self.post_init()

    # -- validation -------------------------------------------------------------------------------------------
    def post_init(self):
        if not hasattr(self, "iters"):  # called from the base __init__ before our fields exist
            return
        _check("bits", self.bits, self.bits in SUPPORTED_BITS, f"one of {SUPPORTED_BITS}")
        gs = self.group_size
        _check("group_size", gs, isinstance(gs, int) and not isinstance(gs, bool) and (gs == -1 or gs > 0),
               f"-1 (per channel) or a positive int; usually one of {STANDARD_GROUP_SIZES}")
        if gs not in STANDARD_GROUP_SIZES:
            logger.warning("group_size=%d is not one of %s: it is used only for layers whose in_features it "
                           "divides, and fast kernels may not support it", gs, STANDARD_GROUP_SIZES)
        _check("sym", self.sym, isinstance(self.sym, bool), "True or False")
        _check("data_type", self.data_type, self.data_type in DATA_TYPES, f"one of {DATA_TYPES}")
        if self.packing_format is not None:
            _check("packing_format", self.packing_format, self.packing_format in KNOWN_FORMATS,
                   f"one of {KNOWN_FORMATS}")
        _check("iters", self.iters, isinstance(self.iters, int) and self.iters >= 0, "an int >= 0")
        for name in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            _check(name, value, isinstance(value, int) and value > 0, "a positive int")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            _check(name, value, value is None or (isinstance(value, (int, float)) and value > 0),
                   "None (= 1/iters) or a positive float")
        _check("seed", self.seed, isinstance(self.seed, int), "an int")
        _check("quant_lm_head", self.quant_lm_head, isinstance(self.quant_lm_head, bool), "True or False")
        _check("extra_config", self.extra_config, isinstance(self.extra_config, dict),
               "a dict of layer name/regex -> overrides")
        for key, override in self.extra_config.items():
            self._check_override(key, override)
        normalize_block_names(self.block_name_to_quantize)  # validates; kept as given so it round-trips

    @staticmethod
    def _check_override(key: str, override):
        where = f"extra_config[{key!r}]"
        _check(where, override, isinstance(override, dict), "a dict such as {'bits': 8, 'group_size': 128}")
        bits = override.get("bits")
        if bits is not None:
            _check(f"{where}['bits']", bits, bits in SUPPORTED_BITS + (FLOAT_BITS, 32),
                   f"one of {SUPPORTED_BITS} or 16 (keep float)")
        gs = override.get("group_size")
        if gs is not None:
            _check(f"{where}['group_size']", gs, isinstance(gs, int) and (gs == -1 or gs > 0), "-1 or a positive int")
        sym = override.get("sym")
        if sym is not None:
            _check(f"{where}['sym']", sym, isinstance(sym, bool), "True or False")

    # -- derived views ----------------------------------------------------------------------------------------
    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.group_size, sym=self.sym)

    def scheme_for(self, layer_name: str) -> QuantScheme | None:
        """The scheme of one layer after ``extra_config`` overrides; None when the layer stays float."""
        override = match_override(self.extra_config, layer_name)
        if override is None:
            return self.scheme
        if override.get("bits", self.bits) >= FLOAT_BITS or override.get("data_type", "int") not in DATA_TYPES:
            return None
        return QuantScheme(
            bits=override.get("bits", self.bits),
            group_size=override.get("group_size", self.group_size),
            sym=override.get("sym", self.sym),
        )

    @property
    def block_names(self) -> list[str] | None:
        return normalize_block_names(self.block_name_to_quantize)

    @property
    def resolved_packing_format(self) -> str:
        from .formats import default_packing_format

        return canonical_format(self.packing_format or default_packing_format(self.scheme))

    # -- (de)serialisation ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        if not isinstance(config_dict, dict):
            raise ValueError(f"quantization_config must be a dict, got {type(config_dict).__name__}")
        config_dict = dict(config_dict)
        method = config_dict.setdefault("quant_method", "auto-round")
        if not isinstance(method, str) or not any(m in method for m in ("auto-round", "gptq", "awq")):
            raise ValueError(f"quant_method={method!r} cannot be read as AutoRound; expected 'auto-round', "
                             f"'intel/auto-round', 'gptq' (v1) or 'awq' (gemm)")
        try:
            return super().from_dict(foreign_to_native(config_dict), return_unused_kwargs=return_unused_kwargs,
                                     **kwargs)
        except (TypeError, NotImplementedError) as err:
            raise ValueError(f"quantization_config is invalid: {err}") from err

    @classmethod
    def coerce(cls, config) -> "AutoRoundConfig":
        """Re-wrap a base-class ``transformers.AutoRoundConfig`` (transformers builds one when merging configs)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        return cls.from_dict(config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in RUNTIME_ONLY_KEYS:
            out.pop(key, None)
        if not out.get("extra_config"):
            out.pop("extra_config", None)
        return out

    def get_loading_attributes(self):
        return {"backend": self.backend}


def foreign_to_native(config: dict) -> dict:
    """A plain GPTQ (v1) or AWQ (gemm) ``quantization_config`` in our terms (also after transformers' base
    ``AutoRoundConfig.from_dict`` has renamed it to ``packing_format: "auto_round:gptq" / "auto_round:awq"``):
    AWQ ``zero_point`` -> ``sym``, ``w_bit`` / ``q_group_size`` -> ``bits`` / ``group_size``, GPTQ ``lm_head`` ->
    ``quant_lm_head``, ``checkpoint_format: "gptq_v2"`` -> raw zero points, ``modules_to_not_convert`` -> float
    layers in ``extra_config``; act-order GPTQ is refused."""
    d = dict(config)
    method, packing = str(d.get("quant_method", "")), str(d.get("packing_format") or "")
    is_awq, is_gptq = "awq" in method or packing == "auto_round:awq", "gptq" in method or packing == "auto_round:gptq"
    if not (is_awq or is_gptq):
        return d
    if is_awq:
        if str(d.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"AWQ checkpoints of version {d['version']!r} cannot be read; only 'gemm'")
        d.setdefault("bits", d.pop("w_bit", 4))
        d.setdefault("group_size", d.pop("q_group_size", 128))
        if "zero_point" in d:
            d["sym"] = not d.pop("zero_point")
        d["packing_format"] = "auto_round:awq"
    else:
        if d.pop("desc_act", False):
            raise ValueError("GPTQ checkpoints with desc_act=True (act-order) cannot be read; only desc_act=False")
        if "lm_head" in d:
            d["quant_lm_head"] = bool(d.pop("lm_head"))
        v2 = str(d.pop("checkpoint_format", "gptq")).lower() == "gptq_v2"
        d["packing_format"] = "auto_round" if v2 else "auto_round:gptq"
    extra = dict(d.get("extra_config") or {})
    for name in d.pop("modules_to_not_convert", None) or []:
        extra.setdefault(name, {"bits": FLOAT_BITS})
    d["extra_config"] = extra
    d["quant_method"] = "auto-round"
    return d


def normalize_block_names(value) -> list[str] | None:
    """``block_name_to_quantize`` as a flat list of container names (accepts str, comma list, list, list of lists)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        flat: list[str] = []
        for item in value:
            flat.extend(normalize_block_names(item) or [])
        return flat
    raise ValueError(f"AutoRoundConfig: block_name_to_quantize={value!r} is invalid; expected a str or list of str")


def match_override(extra_config: dict, layer_name: str) -> dict | None:
    """The override for a layer: an exact name first, then the first key that matches as a regex (or substring)."""
    if layer_name in extra_config:
        return extra_config[layer_name]
    for key, override in extra_config.items():
        try:
            if re.search(key, layer_name):
                return override
        except re.error:
            if key in layer_name:
                return override
    return None
