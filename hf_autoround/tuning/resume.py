"""Resumable tuning (``resume=True``): after every finished block, what a restarted run needs in order to continue
where this one stopped and end with exactly the checkpoint an uninterrupted run writes.

``resume_dir`` holds:

- ``manifest.json``: the run's fingerprint (settings, software versions, model layout, calibration data), for each
  list of blocks the hash of its first block's captured inputs, and per finished block the hash of its float
  weights and its tuning stats; ``hidden`` names the current hidden-state file;
- ``block-<prefix>.safetensors``: the packed layers of each finished block (:class:`~.block_store.BlockStore`);
- ``hidden-<blocks>-<n>.safetensors``: the float and the quantized inputs of block ``n`` and torch's RNG state.

After block ``n`` finishes: its block file, then ``hidden-...-<n+1>``, then the manifest are written, each through a
temporary file renamed into place; the manifest's rename is the commit. Only then is the previous hidden file
deleted. A kill at any instant therefore leaves a manifest whose files all exist; files it does not name (a block
written just before the kill, temporary files) are ignored and replaced. Every block seeds its own sampler from
``seed + block index`` and torch's RNG state is restored, so a restored run repeats exactly what the killed run
would have done.

A directory written by a different run (other settings, model, data or software) is refused, naming what differs.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os

import torch

from ..safetensors_io import TensorEntry, atomic_write, atomic_write_json, read_header, read_tensor, write_tensors

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "hf_autoround-resume/1"


class ResumeMismatch(ValueError):
    """The resume directory was written by a run that differs from this one."""


def digest(value) -> str:
    """sha256 of tensors (dtype, shape and bytes) and plain values, nested in dicts, lists and tuples."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{list(value.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(b"D")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        h.update(repr(value).encode())
    else:  # other objects: their type only (a repr may hold a memory address)
        h.update(type(value).__qualname__.encode())


@dataclasses.dataclass
class Fingerprint:
    """What makes two runs the same run. ``settings`` is kept readable so that a refusal can name the key."""

    settings: dict
    software: dict
    model: str
    data: str

    @classmethod
    def of(cls, model, plan, options, data) -> "Fingerprint":
        import transformers

        from .. import __version__

        layout = [(k, list(t.shape), str(t.dtype)) for k, t in model.state_dict().items()]
        return cls(settings=_settings(plan, options),
                   software={"torch": torch.__version__, "transformers": transformers.__version__,
                             "hf_autoround": __version__},
                   model=digest([type(model).__qualname__, layout]),
                   data=digest([data.input_ids, data.attention_mask]))

    def differences(self, other: "Fingerprint") -> list[str]:
        out = []
        for key in sorted(set(self.settings) | set(other.settings)):
            if self.settings.get(key) != other.settings.get(key):
                out.append(f"setting {key}: {other.settings.get(key)!r} there, {self.settings.get(key)!r} now")
        if self.software != other.software:
            out.append(f"software versions: {other.software} there, {self.software} now")
        if self.model != other.model:
            out.append("model: its class or tensor layout (names, shapes, dtypes) differs")
        if self.data != other.data:
            out.append("calibration data: the token ids differ")
        return out


def _settings(plan, options) -> dict:
    signround = dataclasses.asdict(options.signround)
    signround["compute_dtype"] = str(signround["compute_dtype"])
    return json.loads(json.dumps({
        "signround": signround, "nsamples": options.nsamples, "seqlen": options.seqlen,
        "enable_quanted_input": options.enable_quanted_input, "disable_opt_rtn": options.disable_opt_rtn,
        "init_opt_rtn": options.init_opt_rtn, "channel_scaling": options.scales_channels,
        "cache_dtype": str(options.cache_dtype),
        "packing_format": plan.packing_format, "block_names": list(plan.block_names),
        "layers": {n: [s.bits, s.group_size, s.sym] for n, s in sorted(plan.quantized.items())},
        "kept_float": sorted(plan.kept_float),
    }))


class ResumeState:
    """The manifest of one resume directory, and the writes that advance it."""

    def __init__(self, directory: str, fingerprint: Fingerprint, manifest: dict | None = None):
        self.directory = directory
        self.fingerprint = fingerprint
        self.manifest = manifest or {"format": FORMAT, "fingerprint": dataclasses.asdict(fingerprint),
                                     "containers": {}, "hidden": None}

    @classmethod
    def open(cls, directory: str, fingerprint: Fingerprint) -> "ResumeState":
        """Start or continue the run recorded in ``directory``; raises ResumeMismatch for another run's files."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            logger.info("resume: starting a new run in %s", directory)
            return cls(directory, fingerprint)
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ResumeMismatch(f"resume_dir={directory!r}: {MANIFEST} is not a {FORMAT} manifest; delete the "
                                 f"directory or pass another resume_dir")
        differences = fingerprint.differences(Fingerprint(**manifest["fingerprint"]))
        if differences:
            raise ResumeMismatch(f"resume_dir={directory!r} holds a different run: " + "; ".join(differences) +
                                 ". Delete that directory (or pass another resume_dir) to start over")
        state = cls(directory, fingerprint, manifest)
        state._remove_strays()
        done = {c: len(p["blocks"]) for c, p in manifest["containers"].items()}
        logger.info("resume: continuing the run in %s (finished blocks: %s)", directory, done)
        return state

    def _remove_strays(self) -> None:
        """Hidden-state files the manifest does not name, and temporary files of an interrupted write."""
        keep = self.manifest.get("hidden")
        for path in glob.glob(os.path.join(self.directory, "hidden-*.safetensors*")) + \
                glob.glob(os.path.join(self.directory, "*.tmp-*")):
            if os.path.basename(path) != keep:
                os.remove(path)

    def _progress(self, container: str) -> dict:
        return self.manifest["containers"].setdefault(container, {"inputs": None, "blocks": []})

    def finished(self, container: str) -> list[dict]:
        """Records of the finished blocks of ``container``: ``{"weights": hash, "stats": {...}}`` each."""
        return self.manifest["containers"].get(container, {}).get("blocks", [])

    def check_inputs(self, container: str, inputs) -> None:
        """The captured inputs of the container's first block must be those of the recorded run."""
        value = digest([inputs.hidden, inputs.shared, inputs.per_sample, inputs.extra_args, inputs.token_mask])
        progress = self._progress(container)
        if progress["inputs"] is None:
            progress["inputs"] = value
        elif progress["inputs"] != value:
            raise ResumeMismatch(f"resume_dir={self.directory!r}: the inputs of the first block of {container} "
                                 f"differ from the recorded run's (another model or a changed model config); "
                                 f"delete the directory to start over")

    def check_weights(self, container: str, index: int, weights_hash: str) -> None:
        if self.finished(container)[index]["weights"] != weights_hash:
            raise ResumeMismatch(f"resume_dir={self.directory!r}: the float weights of {container}.{index} differ "
                                 f"from those the recorded run tuned (another model?); delete the directory to "
                                 f"start over")

    def load_hidden(self, container: str, index: int):
        """(float inputs, quantized inputs, torch RNG state) of block ``index``."""
        name = self.manifest["hidden"]
        if name != _hidden_name(container, index):
            raise ResumeMismatch(f"resume_dir={self.directory!r}: its hidden-state file {name!r} is not that of "
                                 f"{container}.{index}; delete the directory to start over")
        stored, _ = read_header(os.path.join(self.directory, name))
        with open(os.path.join(self.directory, name), "rb") as f:
            tensors = {key: read_tensor(s, f) for key, s in stored.items()}
        return tensors["fp_hidden"], tensors.get("q_hidden", tensors["fp_hidden"]), tensors["rng"]

    def record_block(self, container: str, index: int, weights_hash: str, stats, fp_hidden, q_hidden) -> None:
        """Block ``index`` is finished (its packed layers already stored): save the next block's inputs, then
        commit the manifest."""
        name = _hidden_name(container, index + 1)
        entries = [TensorEntry.of("fp_hidden", fp_hidden), TensorEntry.of("rng", torch.get_rng_state())]
        if q_hidden is not fp_hidden:
            entries.append(TensorEntry.of("q_hidden", q_hidden))
        atomic_write(os.path.join(self.directory, name), lambda tmp: write_tensors(tmp, entries))
        blocks = self._progress(container)["blocks"]
        if len(blocks) != index:
            raise RuntimeError(f"resume: {container}.{index} finished out of order ({len(blocks)} recorded)")
        previous = self.manifest["hidden"]
        blocks.append({"weights": weights_hash, "stats": dataclasses.asdict(stats)})
        self.manifest["hidden"] = name
        atomic_write_json(os.path.join(self.directory, MANIFEST), self.manifest)
        if previous and previous != name:
            os.remove(os.path.join(self.directory, previous))


def _hidden_name(container: str, index: int) -> str:
    return f"hidden-{container}-{index}.safetensors"


def remove_resume_dir(directory: str | None) -> None:
    """Delete a resume directory after the checkpoint it led to was saved; a directory holding files this module
    did not write is left alone (with a warning)."""
    import shutil

    if not directory or not os.path.isdir(directory):
        return
    foreign = [n for n in os.listdir(directory) if not n.startswith(("block-", "hidden-", MANIFEST))]
    if foreign:
        logger.warning("resume: not removing %s: it holds files that are not ours (%s)", directory, foreign[:3])
        return
    shutil.rmtree(directory)
    logger.info("resume: removed %s after a successful save", directory)
