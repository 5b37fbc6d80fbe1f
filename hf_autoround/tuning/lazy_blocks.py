"""Low-memory tuning (``low_cpu_mem_usage=True``): the transformer blocks stay in the checkpoint's safetensors files
until each one is tuned.

``load_lazily(path)`` builds the model from its config with every parameter on the meta device (buffers are
created for real, so computed ones such as rotary frequencies are right), marks every block's persistent tensors
meta too, and reads the tensors outside the blocks (embeddings, final norm, lm_head) from the files. While tuning,
``LazyBlocks.load`` reads one block's tensors and ``release`` puts the block back on meta after its packed layers
went to a :class:`~.block_store.BlockStore`. Host memory thus holds one float block, the tensors outside the
blocks and the calibration cache, whatever the depth.

After tuning, the blocks' tensors stay on disk: :func:`hf_autoround.export.export_model` writes the native format
by reading them one at a time (:mod:`hf_autoround.export.streaming`); :func:`materialize` brings the whole
quantised model into memory for anything else. A model is "lazy" while it is registered here (no attribute is
hung on it); ``materialize`` unregisters it.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
import weakref

import torch
import torch.nn as nn

from ..safetensors_io import StoredTensor, read_header, read_tensor
from .allocator import return_free_memory
from .block_store import BlockStore
from .weight_source import WeightSource, assign_tensor

logger = logging.getLogger(__name__)

_LAZY: "weakref.WeakKeyDictionary[nn.Module, LazyBlocks]" = weakref.WeakKeyDictionary()


def lazy_blocks_of(model: nn.Module) -> "LazyBlocks | None":
    return _LAZY.get(model)


class CheckpointFiles:
    """Tensor name -> where it lies, over the safetensors files of a checkpoint folder (headers only)."""

    def __init__(self, folder: str, base_prefix: str = ""):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted({os.path.join(folder, n) for n in json.load(f)["weight_map"].values()})
        else:
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"low_cpu_mem_usage=True reads blocks from safetensors files, and {folder!r} "
                                    f"has none")
        self.folder, self.base_prefix = folder, base_prefix
        self.entries: dict[str, StoredTensor] = {}
        for path in files:
            self.entries.update(read_header(path)[0])

    def find(self, key: str) -> StoredTensor:
        """The stored tensor of a model state-dict key (also under or without the base model's prefix)."""
        candidates = [key]
        if self.base_prefix:
            head = self.base_prefix + "."
            candidates.append(key[len(head):] if key.startswith(head) else head + key)
        for name in candidates:
            if name in self.entries:
                return self.entries[name]
        raise KeyError(f"low_cpu_mem_usage=True: {key!r} is not in the safetensors files of {self.folder!r} "
                       f"(a checkpoint that needs transformers' key conversion cannot be read lazily; load it "
                       f"normally)")

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        return read_tensor(self.find(key)).to(dtype)

    def read_many(self, keys: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """Several tensors, opening each file once. Tensors of 1 MiB and more get memory mappings of their own
        (see ``read_tensor``): a block's weights, freed when the block is released, leave no heap holes behind."""
        located = {k: self.find(k) for k in keys}
        out = {}
        for path in sorted({s.path for s in located.values()}):
            with open(path, "rb") as f:
                for key, stored in located.items():
                    if stored.path == path:
                        out[key] = read_tensor(stored, f, own_mapping=stored.nbytes >= 2**20).to(keys[key])
        return out


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside: every parameter a module registers is created on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a floating torch dtype, its name, 'auto' or None")
    return dtype


def load_lazily(path: str, dtype=None) -> nn.Module:
    """A causal LM from a local checkpoint folder whose blocks stay in the files until tuned (see module doc)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..layers import detect_block_names

    if not os.path.isdir(path):
        raise FileNotFoundError(f"low_cpu_mem_usage=True needs a local checkpoint folder; {path!r} is not one")
    config = AutoConfig.from_pretrained(path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=_resolve_dtype(dtype, config))
    model.eval()
    lazy = LazyBlocks(model, CheckpointFiles(path, getattr(model, "base_model_prefix", "")),
                      detect_block_names(model))
    for container in lazy.containers:
        for i, block in enumerate(model.get_submodule(container)):
            lazy.release(f"{container}.{i}", block)
    lazy.load_outside_blocks()
    _LAZY[model] = lazy
    return model


def _to_meta(module: nn.Module) -> None:
    """Parameters and persistent buffers of ``module`` (and its children) become meta tensors."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and not b.is_meta and name not in m._non_persistent_buffers_set:
                m._buffers[name] = torch.empty_like(b, device="meta")


class LazyBlocks(WeightSource):
    """The lazily loaded model's blocks: read from ``files``, stored packed in ``store`` once tuned."""

    keeps_blocks = False
    all_in_memory = False

    def __init__(self, model: nn.Module, files: CheckpointFiles, containers: list[str]):
        super().__init__(model)
        self.files, self.containers = files, list(containers)
        self.store: BlockStore | None = None
        self._store_index: dict[str, dict] = {}

    def use_store(self, directory: str | None) -> BlockStore:
        """Where tuned blocks go: ``directory`` (the resume directory), or a temporary one removed with the model."""
        if directory is None:
            if self.store is not None:
                return self.store
            directory = tempfile.mkdtemp(prefix="hf_autoround-blocks-")
            weakref.finalize(self.model, shutil.rmtree, directory, True)
        self.store = BlockStore(directory)
        self._store_index = {}
        return self.store

    def read(self, key: str) -> torch.Tensor:
        current = _state_tensor(self.model, key)
        return self.files.read(key, current.dtype)

    def load(self, prefix: str, block: nn.Module) -> None:
        wanted = {k: t.dtype for k, t in block.state_dict().items() if t.is_meta}
        for key, value in self.files.read_many({f"{prefix}.{k}": d for k, d in wanted.items()}).items():
            assign_tensor(block, key[len(prefix) + 1:], value)

    def release(self, prefix: str, block: nn.Module) -> None:
        _to_meta(block)
        return_free_memory()

    def load_outside_blocks(self) -> None:
        """Read every tensor outside the blocks; tied parameters (one tensor under several names) load once."""
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        wanted = {k: t.dtype for k, t in self.model.state_dict().items() if t.is_meta and not self._in_blocks(k)}
        for names in groups.values():
            if len(names) > 1 and any(n in wanted for n in names):
                stored = next((n for n in names if self._stored(n)), None)
                if stored is None:
                    raise KeyError(f"low_cpu_mem_usage=True: none of the tied names {names} is in the files")
                value = nn.Parameter(self.files.read(stored, _state_tensor(self.model, stored).dtype))
                for n in names:
                    owner, _, attr = n.rpartition(".")
                    self.model.get_submodule(owner)._parameters[attr] = value
                    wanted.pop(n, None)
        for key, value in self.files.read_many(wanted).items():
            assign_tensor(self.model, key, value)

    def _stored(self, key: str) -> bool:
        try:
            self.files.find(key)
            return True
        except KeyError:
            return False

    def _in_blocks(self, key: str) -> bool:
        return any(key.startswith(c + ".") for c in self.containers)

    def block_of(self, key: str) -> tuple[str, str] | None:
        """(block prefix, key relative to it) for a key inside a block, else None."""
        for c in self.containers:
            if key.startswith(c + "."):
                index, _, rest = key[len(c) + 1:].partition(".")
                return f"{c}.{index}", rest
        return None

    def stored_packed(self, key: str) -> StoredTensor | None:
        """Where a packed layer's tensor of a tuned block lies in the store, or None."""
        located = self.block_of(key)
        if located is None or self.store is None:
            return None
        prefix, rest = located
        if prefix not in self._store_index:
            self._store_index[prefix] = self.store.tensors(prefix) if self.store.has(prefix) else {}
        return self._store_index[prefix].get(rest)

    def loader(self, key: str, current: torch.Tensor):
        """A zero-argument callable giving the real tensor of ``key`` (``current``: its meta stand-in)."""
        if not current.is_meta:
            return lambda: current
        packed = self.stored_packed(key)
        if packed is not None:
            return lambda: read_tensor(packed)
        return lambda: self.files.read(key, current.dtype)


def _state_tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def materialize(model: nn.Module) -> nn.Module:
    """Bring a lazily tuned model wholly into memory (packed blocks from the store, the rest from the checkpoint)
    and make it an ordinary model; a no-op for a model that is not lazy."""
    lazy = _LAZY.get(model)
    if lazy is None:
        return model
    for key, current in model.state_dict(keep_vars=True).items():
        if current.is_meta:
            assign_tensor(model, key, lazy.loader(key, current)())
    del _LAZY[model]
    config = getattr(model.config, "quantization_config", None)
    if config is not None and getattr(model, "is_quantized", False):
        from ..quantize import attach_default_kernels

        attach_default_kernels(model, config)
    return model
