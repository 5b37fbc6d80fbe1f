"""Writing quantised models to disk, one module per format family.

``export_model(model, tokenizer, output_dir, formats)`` is the single entry point. ``formats`` is a comma list; with
one format the checkpoint is written to ``output_dir`` itself, with several each goes to a sub-directory named after
the format (``:`` replaced by ``-``). Every directory is written to a temporary sibling and renamed into place, so a
crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def parse_formats(formats: str | list[str]) -> list[str]:
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    if not names:
        raise ValueError(f"format={formats!r} names no format")
    for name in names:
        writer_for(name)  # raises on an unknown name before anything is written
    return names


def writer_for(name: str):
    from . import auto_round

    writers = {"auto_round": auto_round.write}
    for alias in ("auto_round:auto_gptq", "auto_round:auto_awq", "auto_round:gptqmodel"):
        writers[alias] = auto_round.write
    if name not in writers:
        raise ValueError(f"format={name!r} is unknown; expected a comma list of {sorted(writers)}")
    return writers[name]


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


def export_model(model, tokenizer, output_dir: str, formats="auto_round", overwrite: bool = False) -> dict:
    """Write ``model`` in each format; returns format -> directory written."""
    names = parse_formats(formats)
    targets = {n: output_dir if len(names) == 1 else os.path.join(output_dir, subdir_name(n)) for n in names}
    for target in targets.values():
        check_output_dir(target, overwrite)
    for name, target in targets.items():
        with atomic_directory(target, overwrite) as tmp:
            writer_for(name)(model, tokenizer, tmp, name)
        logger.info("wrote %s checkpoint to %s", name, target)
    return targets
