"""Writing quantised models to disk, one module per format family.

``export_model(model, tokenizer, output_dir, formats)`` is the single entry point. ``formats`` is a comma list; with
one format the checkpoint is written to ``output_dir`` itself, with several each goes to a sub-directory named after
the format (``:`` replaced by ``-``, e.g. ``gguf-q4_k_m``).

Formats: ``auto_round`` (native, the model's packing), ``auto_round:auto_gptq``, ``auto_round:auto_awq``,
``auto_round:gptqmodel`` (native with that packing), ``auto_gptq`` and ``auto_awq`` (plain GPTQ v1 / AWQ GEMM
checkpoints, :mod:`.gptq_awq`), and ``gguf:<type>`` (one ``.gguf`` file, :mod:`.gguf`).

Every directory is written to a temporary sibling and renamed into place, so a crash never leaves a half-written
checkpoint. ``parse_formats`` validates names, schemes and output directories before any tuning starts.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def parse_formats(formats: str | list[str], scheme=None, output_dir: str | None = None,
                  overwrite: bool = False) -> list[str]:
    """Validate a format list *before* any tuning: unknown names, formats that cannot hold ``scheme`` (a
    QuantScheme or an AutoRoundConfig; None skips that check) and, given ``output_dir``, target directories that
    exist and are not empty all raise ValueError. Returns the list of format names."""
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    if not names:
        raise ValueError(f"format={formats!r} names no format")
    if len(set(names)) != len(names):
        raise ValueError(f"format={formats!r} names a format twice")
    scheme = getattr(scheme, "scheme", scheme)
    on_grid = grid_target(names) is not None  # tuning will use the file's own grids
    for name in names:
        writer_for(name)  # raises on an unknown name before anything is written
        check_scheme(name, scheme, on_grid)
    if output_dir is not None:
        for target in target_dirs(output_dir, names).values():
            check_output_dir(target, overwrite)
    return names


def grid_target(formats: str | list[str]) -> str | None:
    """The GGUF format whose grids tuning optimises: the only format asked for, when it stores quantised
    weights (``gguf:q4_k_m``); None otherwise (integer tuning; a GGUF file among several formats re-quantises)."""
    from . import gguf as gguf_export

    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    if len(names) != 1 or not names[0].startswith(gguf_export.PREFIX):
        return None
    return names[0] if gguf_export.stores_quantized(names[0]) else None


def check_scheme(name: str, scheme, on_grid: bool = False) -> None:
    from . import gguf as gguf_export
    from . import gptq_awq

    if name.startswith(gguf_export.PREFIX):
        gguf_export.check_scheme(name, scheme, on_grid)
    else:
        gptq_awq.check_scheme(name, scheme)


def writer_for(name: str):
    from . import gguf as gguf_export
    from . import gptq_awq

    writers = {fmt: gptq_awq.write for fmt in gptq_awq.FORMATS}
    writers.update({fmt: gguf_export.write for fmt in gguf_export.FORMATS})
    if name not in writers:
        raise ValueError(f"format={name!r} is unknown; expected a comma list of {sorted(writers)}")
    return writers[name]


def preflight(model, tokenizer, name: str) -> None:
    from . import gguf as gguf_export
    from . import gptq_awq

    (gguf_export if name.startswith(gguf_export.PREFIX) else gptq_awq).preflight(model, tokenizer, name)


def target_dirs(output_dir: str, names: list[str]) -> dict[str, str]:
    return {n: output_dir if len(names) == 1 else os.path.join(output_dir, subdir_name(n)) for n in names}


def check_output_dir(path: str, overwrite: bool = False) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output_dir={path!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"output_dir={path!r} exists and is not empty; choose another or pass overwrite=True")


@contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on failure it is removed."""
    check_output_dir(path, overwrite)
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(path)) + ".partial-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def subdir_name(fmt: str) -> str:
    return fmt.replace(":", "-")


def _materialize_unless_streamed(model, names: list[str]) -> None:
    """A model tuned with ``low_cpu_mem_usage=True`` keeps its blocks on disk; formats other than its own packing
    need it in memory (packed: a fraction of the float model)."""
    from ..tuning.lazy_blocks import lazy_blocks_of, materialize
    from . import streaming

    if lazy_blocks_of(model) is not None and not all(streaming.can_stream(model, n) for n in names):
        logger.info("low_cpu_mem_usage: bringing the quantised blocks into memory to write %s", ",".join(names))
        materialize(model)


def _writer(model, name: str):
    from . import streaming

    return streaming.write if streaming.can_stream(model, name) else writer_for(name)


def export_model(model, tokenizer, output_dir: str, formats="auto_round", overwrite: bool = False) -> dict:
    """Write ``model`` in each format; returns format -> directory written."""
    names = parse_formats(formats)
    targets = target_dirs(output_dir, names)
    for target in targets.values():
        check_output_dir(target, overwrite)
    _materialize_unless_streamed(model, names)
    tuned_on = getattr(model, "gguf_tuning", None)
    for name in names:  # every format's own checks first: nothing is written unless all can be
        if tuned_on is not None:
            tuned_on.check_format(name)
        preflight(model, tokenizer, name)
    for name, target in targets.items():
        with atomic_directory(target, overwrite) as tmp:
            _writer(model, name)(model, tokenizer, tmp, name)
        logger.info("wrote %s checkpoint to %s", name, target)
    return targets
