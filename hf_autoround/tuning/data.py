"""Calibration data: every accepted form of ``dataset`` becomes a ``CalibrationData`` of ``nsamples`` x ``seqlen`` ids.

Accepted (all offline):
- ``None``: the English Wikipedia passages shipped in ``hf_autoround/data/calib_wiki.txt`` (concatenated).
- a path to ``.txt`` (one sample per paragraph when the file has blank lines, else per line), ``.json`` (a list of
  strings or objects) or ``.jsonl`` (one object per line); objects carry ``text`` or chat ``messages``.
- the combination syntax ``"a.jsonl:num=256,b.txt:num=128:concat=True"``; per-source options are ``num``,
  ``concat`` (join all samples with EOS and cut into ``seqlen`` chunks), ``apply_chat_template`` and
  ``system_prompt``.
- a list of strings, of token-id tensors / lists, or of dicts (``input_ids`` [+ ``attention_mask``], ``text`` or
  ``messages``); a 2-D tensor of ids.
- a hub dataset name, only when the hub is reachable.
Records of a file or hub source are shuffled with the seed first; a list is used in its order.
Samples shorter than ``seqlen`` are dropped (and counted in a log line) unless concatenated; longer ones are cut.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

BUNDLED_CALIB = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "calib_wiki.txt")
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")
HUB_HOST = ("huggingface.co", 443)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"


@dataclass
class CalibrationData:
    """``input_ids`` ``[n, seqlen]``; ``attention_mask`` ``[n, seqlen]`` or None when every token is real."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class SourceSpec:
    """One entry of the combination syntax."""

    source: object
    num: int | None = None
    concat: bool = False
    apply_chat_template: bool = False
    system_prompt: str | None = None


@dataclass
class _Collected:
    ids: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    dropped: int = 0


# -- parsing the dataset argument ----------------------------------------------------------------------------------
def _parse_bool(value: str) -> bool:
    if value.lower() in ("", "true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"dataset option value {value!r} is not a boolean")


def parse_source(entry: str) -> SourceSpec:
    """``"path:num=256:concat=True:apply_chat_template:system_prompt=..."`` -> SourceSpec."""
    name, *options = entry.strip().split(":")
    spec = SourceSpec(source=name.strip())
    for option in options:
        key, _, value = option.partition("=")
        key = key.strip()
        if key == "num":
            if not value.strip().isdigit() or int(value) <= 0:
                raise ValueError(f"dataset {entry!r}: num={value!r} must be a positive int")
            spec.num = int(value)
        elif key == "concat":
            spec.concat = _parse_bool(value.strip())
        elif key == "apply_chat_template":
            spec.apply_chat_template = _parse_bool(value.strip())
        elif key == "system_prompt":
            spec.system_prompt = value
        else:
            raise ValueError(f"dataset {entry!r}: unknown option {key!r}; expected num, concat, "
                             f"apply_chat_template or system_prompt")
    return spec


def parse_dataset_arg(dataset) -> list[SourceSpec]:
    if dataset is None:
        return [SourceSpec(BUNDLED_CALIB, concat=True)]
    if isinstance(dataset, str):
        if not dataset.strip():
            raise ValueError("dataset='' names no data; pass a file path, a list of texts or None for the default")
        return [parse_source(entry) for entry in dataset.split(",") if entry.strip()]
    if isinstance(dataset, torch.Tensor):
        return [SourceSpec(list(dataset) if dataset.dim() == 2 else [dataset])]
    if isinstance(dataset, (list, tuple)):
        if len(dataset) == 0:
            raise ValueError("dataset is an empty list; pass at least one sample")
        return [SourceSpec(list(dataset))]
    raise TypeError(f"dataset of type {type(dataset).__name__} is not supported; pass a path, the combination "
                    f"syntax 'a.jsonl:num=256,b.txt', a list of strings / token tensors / dicts, or None")


# -- reading records -----------------------------------------------------------------------------------------------
def _read_txt(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if "\n\n" in text.strip():
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_json(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if isinstance(data, dict):
        for key in ("train", "data", "samples"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"{path}: a .json file must hold a list of samples (or a dict with a 'train' list)")
    return data


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("HF_DATASETS_OFFLINE"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _read_hub(name: str) -> list:
    if not _hub_reachable():
        raise ValueError(f"dataset {name!r} is neither a local file nor reachable: the Hugging Face hub cannot be "
                         f"reached from here. Pass a local file instead, e.g. dataset='my_data.jsonl' (a 'text' or "
                         f"'messages' field per line), dataset='notes.txt', a list of strings, or None for the "
                         f"bundled default set")
    import datasets

    return list(datasets.load_dataset(name, split="train"))


def read_records(source) -> list:
    """The raw records of one source: strings, dicts or token sequences."""
    if not isinstance(source, str):
        return list(source)
    if os.path.isfile(source):
        if source.endswith(".txt"):
            return _read_txt(source)
        if source.endswith((".json", ".jsonl")):
            return _read_json(source)
        raise ValueError(f"dataset file {source!r}: unknown extension; expected one of {LOCAL_SUFFIXES}")
    if source.endswith(LOCAL_SUFFIXES) or not HUB_NAME.match(source):
        raise FileNotFoundError(f"dataset file {source!r} does not exist")
    return _read_hub(source)


# -- records -> token ids ------------------------------------------------------------------------------------------
def _chat_text(tokenizer, messages, system_prompt):
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _record_text(record, spec: SourceSpec, tokenizer) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return _chat_text(tokenizer, record["messages"], spec.system_prompt)
        if "text" not in record:
            raise ValueError(f"dataset record has no 'text', 'messages' or 'input_ids' field: keys {sorted(record)}")
        record = record["text"]
    if not isinstance(record, str):
        raise ValueError(f"dataset record of type {type(record).__name__} is not a text, token ids or a dict")
    if spec.apply_chat_template:
        return _chat_text(tokenizer, [{"role": "user", "content": record}], spec.system_prompt)
    return record


def _as_ids(record, spec: SourceSpec, tokenizer):
    """(ids 1-D long, mask 1-D or None) for one record."""
    if isinstance(record, dict) and "input_ids" in record:
        ids = torch.as_tensor(record["input_ids"]).reshape(-1).long()
        mask = record.get("attention_mask")
        return ids, None if mask is None else torch.as_tensor(mask).reshape(-1).long()
    if isinstance(record, torch.Tensor) or isinstance(record, (list, tuple)) and record and isinstance(record[0], int):
        return torch.as_tensor(record).reshape(-1).long(), None
    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer: pass tokenizer=...")
    text = _record_text(record, spec, tokenizer)
    add_special = not spec.apply_chat_template and not (isinstance(record, dict) and "messages" in record)
    return torch.tensor(tokenizer(text, add_special_tokens=add_special)["input_ids"], dtype=torch.long), None


def _collect_samples(records, spec, tokenizer, seqlen, want, out: _Collected) -> None:
    for record in records:
        if len(out.ids) >= want:
            return
        ids, mask = _as_ids(record, spec, tokenizer)
        if ids.numel() < seqlen:
            out.dropped += 1
            continue
        out.ids.append(ids[:seqlen])
        out.masks.append(None if mask is None else mask[:seqlen])


def _collect_concat(records, spec, tokenizer, seqlen, want, out: _Collected) -> None:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    buffer, length = [], 0
    for record in records:
        if len(out.ids) >= want:
            return
        ids, _ = _as_ids(record, spec, tokenizer)
        buffer.append(ids)
        length += ids.numel()
        if eos is not None:
            buffer.append(torch.tensor([eos]))
            length += 1
        while length >= seqlen and len(out.ids) < want:
            joined = torch.cat(buffer)
            out.ids.append(joined[:seqlen])
            out.masks.append(None)
            buffer, length = [joined[seqlen:]], joined.numel() - seqlen


def load_source(spec: SourceSpec, tokenizer, seqlen: int, want: int, seed: int) -> _Collected:
    records = read_records(spec.source)
    if not records:
        raise ValueError(f"dataset {_describe(spec.source)} holds no samples")
    if isinstance(spec.source, str):  # a corpus: a seeded random pick; an in-memory list is used in its order
        random.Random(seed).shuffle(records)
    want = min(want, spec.num) if spec.num else want
    out = _Collected()
    collect = _collect_concat if spec.concat else _collect_samples
    collect(records, spec, tokenizer, seqlen, want, out)
    if out.dropped:
        logger.info("calibration: dropped %d samples of %s shorter than seqlen=%d (add ':concat=True' to join them)",
                    out.dropped, _describe(spec.source), seqlen)
    return out


def _describe(source) -> str:
    return repr(source) if isinstance(source, str) else f"<list of {len(source)}>"


def get_calibration_data(dataset, tokenizer, seqlen: int, nsamples: int, seed: int = 42) -> CalibrationData:
    """Load, tokenise, filter and stack calibration samples; raises before any tuning when nothing usable is left."""
    specs = parse_dataset_arg(dataset)
    collected = _Collected()
    for spec in specs:
        part = load_source(spec, tokenizer, seqlen, nsamples - len(collected.ids), seed)
        collected.ids += part.ids
        collected.masks += part.masks
        if len(collected.ids) >= nsamples:
            break
    if not collected.ids:
        raise ValueError(f"no calibration sample has seqlen={seqlen} tokens; use longer samples, a smaller seqlen, "
                         f"or join short ones with the ':concat=True' option (e.g. dataset='data.txt:concat=True')")
    if len(collected.ids) < nsamples:
        logger.warning("calibration: only %d of nsamples=%d samples of %d tokens are available; using %d",
                       len(collected.ids), nsamples, seqlen, len(collected.ids))
    return _stack(collected)


def _stack(collected: _Collected) -> CalibrationData:
    ids = torch.stack(collected.ids)
    if all(m is None for m in collected.masks):
        return CalibrationData(ids)
    mask = torch.stack([torch.ones_like(i) if m is None else m for i, m in zip(collected.ids, collected.masks)])
    return CalibrationData(ids, None if bool(mask.all()) else mask)
