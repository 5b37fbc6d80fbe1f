"""Writing a model as one GGUF file with the ``gguf`` package's ``GGUFWriter``: tensors (quantised per
:mod:`.mixes` with the per-type block modules), architecture metadata and the tokenizer, so that llama.cpp and
transformers' GGUF loader run it.

Source weights are the model's float linears, or the dequantised weights of its QuantLinear layers. Llama's q/k
projection rows are permuted the way llama.cpp's converter does (rotary halves interleaved); readers undo it.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as T

from .mixes import BLOCK_MODULES, MIXES, tensor_type

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    arch: gguf.MODEL_ARCH
    permute_qk: bool


ARCHS = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, False),
}


@dataclass
class GGUFTensor:
    hf_name: str
    gguf_name: str
    qtype: T
    data: np.ndarray  # what is written: float32 / float16 values, or uint8 blocks
    dequantized: torch.Tensor  # float32, in the model's (HF) row order: what a reader gets back


def arch_spec(model) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"GGUF export supports model types {sorted(ARCHS)}, not {model_type!r}")
    return ARCHS[model_type]


def source_tensors(model) -> dict:
    """Every persistent tensor of the model: a float tensor, or the QuantLinear that holds a linear's weight."""
    from ...quant_linear import QuantLinear

    state = {}
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for key, tensor in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in quant:
            state[key] = tensor
    for name, layer in quant.items():
        state[f"{name}.weight"] = layer
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row index ``perm`` such that ``w[perm]`` is the llama.cpp layout of a q/k projection with ``n_head`` heads."""
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


def direct_params(layer, qtype: T) -> dict | None:
    """Block parameters taken over from a QuantLinear whose grid this type stores without re-rounding the codes:
    Q4_0 <- W4 g32 sym, Q8_0 <- W8 g32 sym (exact), Q4_1 <- W4 g32 asym (exact codes and scales; the min
    ``-zero*scale`` is rounded to fp16). None when the layer's scheme is not one of these."""
    scheme = layer.spec.scheme
    wanted = {T.Q4_0: (4, True), T.Q8_0: (8, True), T.Q4_1: (4, False)}.get(qtype)
    if wanted is None or scheme.group_len(layer.in_features) != 32 or (scheme.bits, scheme.sym) != wanted:
        return None
    qw = layer.unpack()
    codes = qw.codes.t().float().reshape(-1, 32)  # [out * in/32, 32], rows of the torch weight
    scales = qw.scales.float().t().reshape(-1, 1)
    zeros = qw.zeros.float().t().reshape(-1, 1)
    if qtype == T.Q4_0:
        return {"d": scales, "q": codes}
    if qtype == T.Q8_0:
        return {"d": scales, "q": codes - 128}
    return {"d": scales, "m": (-zeros * scales).to(torch.float16).float(), "q": codes}


def quantize_tensor(w, qtype: T, perm: torch.Tensor | None = None,
                    params: dict | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """(array to write, dequantised float32 tensor in the source row order) for a float tensor or QuantLinear;
    ``perm`` reorders the rows of what is written; ``params`` (from ``grid.block_params``) are packed unchanged."""
    from ...qdq import dequantize_weight
    from ...quant_linear import QuantLinear

    if params is None and isinstance(w, QuantLinear):
        params = direct_params(w, qtype)
        if params is None:
            w = dequantize_weight(w.unpack(), torch.float32)
    if params is None:
        w = w.detach().to(torch.float32)
        if qtype in (T.F32, T.F16, T.BF16):
            stored = w.to({T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype])
            deq = stored.to(torch.float32)
            stored = stored if perm is None else stored[perm]
            data = stored.view(torch.uint8) if qtype == T.BF16 else stored
            return data.numpy().reshape(stored.shape[0], -1).copy() if w.dim() > 1 else data.numpy().copy(), deq
        with torch.no_grad():
            params = BLOCK_MODULES[qtype].quantize(w.reshape(-1, BLOCK_MODULES[qtype].BLOCK))
    mod = BLOCK_MODULES[qtype]
    rows = w.out_features if isinstance(w, QuantLinear) else w.shape[0]
    with torch.no_grad():
        deq = mod.dequantize(params).reshape(rows, -1)
    if perm is not None:
        params = {k: v.reshape(rows, -1)[perm].reshape(v.shape) for k, v in params.items()}
    return mod.pack(params).reshape(rows, -1), deq


@dataclass(frozen=True)
class TensorSlot:
    """How one model tensor is written: its GGUF name, GGML type and row order (``perm``, None = as is)."""

    gguf_name: str
    qtype: T
    perm: torch.Tensor | None = None


def tensor_slots(model, fmt: str) -> dict[str, TensorSlot]:
    """Every tensor of the GGUF file for format ``fmt`` (a key of ``mixes.MIXES``), by HF tensor name."""
    spec = arch_spec(model)
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(spec.arch, n_layers)
    slots = {}
    for key, source in source_tensors(model).items():
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"GGUF export: no GGUF name for tensor {key!r} of a {cfg.model_type} model")
        shape = (source.out_features, source.in_features) if hasattr(source, "unpack") else tuple(source.shape)
        perm = None
        if spec.permute_qk and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
            perm = qk_row_order(shape[0], n_head if ".attn_q." in gguf_name else n_kv)
        slots[key] = TensorSlot(gguf_name, tensor_type(fmt, gguf_name, shape, n_layers, n_head // n_kv, tied), perm)
    return slots


def quantize_model_tensors(model, fmt: str, params: dict | None = None) -> list[GGUFTensor]:
    """Every tensor of the GGUF file for format ``fmt``, quantised. ``params`` maps a weight name
    (``model.layers.0.mlp.down_proj.weight``) to ``(type name, block params)`` computed elsewhere (a GGUF-grid
    tuning run); such a weight is written with exactly those parameters."""
    params = params or {}
    sources = source_tensors(model)
    out, requantized = [], {}
    for key, slot in tensor_slots(model, fmt).items():
        source, given = sources[key], params.get(key)
        if given is not None:
            given_type = T[given[0].upper()] if isinstance(given[0], str) else given[0]
            if given_type != slot.qtype:
                raise ValueError(f"{key}: tuned on the {given_type.name} grid, but format {fmt} stores it as "
                                 f"{slot.qtype.name}")
        if given is None and hasattr(source, "unpack") and direct_params(source, slot.qtype) is None:
            requantized.setdefault((source.spec.scheme.describe(), slot.qtype.name), []).append(key)
        data, deq = quantize_tensor(source, slot.qtype, slot.perm, None if given is None else given[1])
        out.append(GGUFTensor(key, slot.gguf_name, slot.qtype, data, deq))
    for (scheme, qtype), keys in requantized.items():
        logger.warning("GGUF %s: %d %s layers re-quantised to %s (their tuned rounding is not kept; quantise on "
                       "the GGUF grid to keep it: quantize_and_save with this format alone)", fmt, len(keys),
                       scheme, qtype)
    return out


def dequantized_float_model(model, tensors: list[GGUFTensor]):
    """A new float32 model of the same class whose weights are exactly what a GGUF reader dequantises."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config).to(torch.float32)
    state = {t.hf_name: t.dequantized for t in tensors}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise RuntimeError(f"dequantized model: missing {missing}, unexpected {unexpected}")
    if tied:
        fresh.tie_weights()
    return fresh.eval()


def _add_metadata(w: gguf.GGUFWriter, model, fmt: str) -> None:
    cfg = model.config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(os.path.basename(str(getattr(cfg, "_name_or_path", "") or cfg.model_type).rstrip("/")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(MIXES[fmt].file_type)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None)) if isinstance(rope, dict) else None
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
        logger.warning("GGUF export: rope_type %r is not written; readers will use plain RoPE", rope["rope_type"])
    w.add_vocab_size(cfg.vocab_size)


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None) -> None:
    """Tokens, scores, types and special ids from the tokenizer files (read by the ``gguf`` package's vocab
    classes): SentencePiece models as ``llama``, byte-level BPE as ``gpt2``."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        sp_model = _sentencepiece_file(tokenizer)
        if sp_model and not (path / "tokenizer.model").is_file():
            shutil.copyfile(sp_model, path / "tokenizer.model")
        if (path / "tokenizer.model").is_file():
            vocab, model_name, merges = gguf.vocab.SentencePieceVocab(path), "llama", False
        else:
            try:
                vocab, model_name, merges = gguf.vocab.BpeVocab(path), "gpt2", True
            except FileNotFoundError:  # a SentencePiece-style BPE known only through tokenizer.json
                vocab, model_name, merges = gguf.vocab.LlamaHfVocab(path), "llama", False
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        while len(tokens) < vocab_size:  # embedding rows beyond the tokenizer (padding)
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model(model_name)
        w.add_tokenizer_pre(pre or "default")
        w.add_token_list(tokens[:vocab_size] if len(tokens) > vocab_size else tokens)
        w.add_token_scores(scores[: len(tokens)])
        w.add_token_types(types[: len(tokens)])
        gguf.vocab.SpecialVocab(path, load_merges=merges, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _sentencepiece_file(tokenizer) -> str | None:
    for candidate in (getattr(tokenizer, "vocab_file", None),
                      os.path.join(str(getattr(tokenizer, "name_or_path", "") or ""), "tokenizer.model")):
        if candidate and str(candidate).endswith(".model") and os.path.isfile(candidate):
            return str(candidate)
    return None


def gguf_file_name(model, fmt: str) -> str:
    base = os.path.basename(str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/")) or "model"
    return f"{base}-{fmt.upper()}.gguf"


def write_gguf(model, tokenizer, path: str, fmt: str, tokenizer_pre: str | None = None,
               params: dict | None = None) -> list[GGUFTensor]:
    """Write ``model`` as the GGUF file ``path`` in format ``fmt``; returns the tensors written (``params``: see
    :func:`quantize_model_tensors`)."""
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer: llama.cpp reads the vocabulary from the file")
    spec = arch_spec(model)
    tensors = quantize_model_tensors(model, fmt, params)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[spec.arch])
    _add_metadata(w, model, fmt)
    _add_tokenizer(w, tokenizer, model.config.vocab_size, tokenizer_pre)
    for t in tensors:
        w.add_tensor(t.gguf_name, t.data, raw_dtype=t.qtype if t.qtype not in (T.F32, T.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    counts: dict = {}
    for t in tensors:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    logger.info("wrote %s (%s): %s", path, fmt, counts)
    return tensors
