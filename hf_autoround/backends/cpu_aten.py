"""CPU kernels on torch's own weight-only ops (DESIGN.md §5), repacked once from the checkpoint layout.

``cpu_int4`` — ``aten._weight_int4pack_mm_for_cpu`` for 2, 3 and 4 bits. The op dequantises ``w = (q - 8) * scale +
zero`` with 4-bit codes ``q`` and one (scale, zero) pair per op group of 32/64/128/256 inputs. Our codes map onto it
exactly:

* 2 and 3 bits, and 4 bits whenever it fits (symmetric, zero point 8): ``q = code - zp + 8`` lies in 0..15, zero 0;
* other 4-bit asymmetric layers: ``q = code`` and ``zero = (8 - zp) * scale``.

Group sizes the op does not have (per channel, partial last groups, 96, ...) are expressed with a smaller op group
whose boundaries include every checkpoint group boundary, repeating the scales (``op_group_size``).

``cpu_int8`` — per-channel layers use ``aten._weight_int8pack_mm`` on ``code - 128`` (an asymmetric zero point adds
``rowsum(x) * (128 - zp) * scale``); grouped 8-bit layers split every code into two nibbles and run the int4 op
twice: ``w = 16 s (hi - 8) + s (lo - 8) + s (136 - zp)``, exact up to the bf16 rounding of the scales.

Activations: both ops are fast only for bfloat16 inputs (float32 / float16 inputs are 30-40x slower), so the
kernels round the activations to bfloat16, accumulate in float32 inside the op, and return the result in the
caller's dtype (float32 models stay float32 end to end; nothing becomes float16). Scales are held in bfloat16.
For a product computed entirely in float32 use ``backend="torch"``. The derived tensors live on the kernel object,
never in the layer's buffers, so ``state_dict`` / ``save_pretrained`` keep writing the checkpoint layout.
"""
from __future__ import annotations

import torch

OP_GROUP_SIZES = (256, 128, 64, 32)
ACT_DTYPE = torch.bfloat16
INNER_K_TILES = 2  # required by the op's signature; the CPU implementation picks its own blocking


def op_group_size(group_len: int, in_features: int) -> int | None:
    """The largest op group size that divides ``in_features`` and puts a boundary at every checkpoint group
    boundary (``i * group_len`` for ``0 < i * group_len < in_features``); None when there is none."""
    for g in OP_GROUP_SIZES:
        if in_features % g == 0 and (group_len >= in_features or group_len % g == 0):
            return g
    return None


def int4_op_unfit(scheme, in_features: int, out_features: int) -> str | None:
    """Why the int4 op cannot hold this layer, or None."""
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    if op_group_size(scheme.group_len(in_features), in_features) is None:
        return (f"no op group size in {OP_GROUP_SIZES} divides in_features {in_features} "
                f"and the group length {scheme.group_len(in_features)}")
    return None


def int8_unfit(scheme, in_features: int, out_features: int) -> str | None:
    if scheme.n_groups(in_features) == 1:  # per channel: _weight_int8pack_mm
        if in_features % 8:  # its vectorised loop reads past the row otherwise (a segfault in torch 2.13)
            return f"in_features {in_features} is not a multiple of 8"
        return None
    return int4_op_unfit(scheme, in_features, out_features)


def _per_op_group(t: torch.Tensor, group_len: int, op_group: int, in_features: int) -> torch.Tensor:
    """``[n_groups, out]`` -> ``[in_features / op_group, out]``: the checkpoint group of every op group."""
    starts = torch.arange(0, in_features, op_group, device=t.device)
    return t.index_select(0, starts // group_len)


def _pack_int4(codes_in_out: torch.Tensor) -> torch.Tensor:
    """int32 codes ``[in, out]`` in 0..15 -> the op's ISA-specific blob (built here, never saved)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_in_out.t().contiguous(), INNER_K_TILES)


class _Int4Operand:
    """One call of the int4 op: packed codes, op group size and the (scale, zero) pairs."""

    __slots__ = ("packed", "group", "sz")

    def __init__(self, codes_in_out, scale, zero, group):
        self.packed = _pack_int4(codes_in_out)
        self.group = group
        self.sz = torch.stack([scale, zero], dim=-1).to(ACT_DTYPE).contiguous()

    def __call__(self, x_bf16: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, self.packed, self.group, self.sz)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.sz.numel() * self.sz.element_size()


def _group_views(qw):
    K = qw.in_features
    group_len = qw.scheme.group_len(K)
    op_group = op_group_size(group_len, K)
    if op_group is None:
        raise ValueError(int4_op_unfit(qw.scheme, K, qw.out_features))
    scales = _per_op_group(qw.scales.float(), group_len, op_group, K)
    zeros = _per_op_group(qw.zeros, group_len, op_group, K)
    return op_group, scales, zeros


def int4_operand(qw) -> _Int4Operand:
    """Map a 2/3/4-bit ``QuantizedWeight`` onto one int4-op operand (exact, see the module docstring)."""
    if qw.scheme.bits > 4:
        raise ValueError(f"{qw.scheme.bits}-bit codes do not fit the int4 op")
    op_group, scales, zeros = _group_views(qw)
    zeros_per_row = qw.zeros.index_select(0, qw.group_index())
    shifted = qw.codes - zeros_per_row + 8
    del zeros_per_row
    if int(shifted.min()) >= 0 and int(shifted.max()) <= 15:
        return _Int4Operand(shifted, scales, torch.zeros_like(scales), op_group)
    del shifted
    return _Int4Operand(qw.codes, scales, (8 - zeros.float()) * scales, op_group)


class _Kernel:
    """Shared plumbing: flatten to 2-D, round to bf16, call, cast back, add the bias in the caller's dtype."""

    name = "?"

    def __init__(self, layer):
        self.layer = layer  # for the bias only (it may change dtype with model.to)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def _matmul(self, x_bf16: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xb = x2.to(ACT_DTYPE).contiguous()
        y = self._matmul(xb, x2)
        y = y.to(x.dtype)
        bias = self.layer.bias
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)


class AtenInt4Kernel(_Kernel):
    name = "cpu_int4"

    def __init__(self, layer):
        super().__init__(layer)
        self.op = int4_operand(layer.unpack())

    def _matmul(self, xb, x_orig):
        return self.op(xb)

    def nbytes(self) -> int:
        return self.op.nbytes()


class AtenInt8Kernel(_Kernel):
    name = "cpu_int8"

    def __init__(self, layer):
        super().__init__(layer)
        qw = layer.unpack()
        self.offset = None
        if qw.scheme.n_groups(qw.in_features) == 1:
            self.mode = "int8pack"
            self.w8 = (qw.codes - 128).t().contiguous().to(torch.int8)  # [out, in]
            scale = qw.scales[0].float()
            self.scale = scale.to(ACT_DTYPE)
            zero = qw.zeros[0]
            if bool((zero != 128).any()):  # asymmetric: w = (c - 128) s + (128 - zp) s
                self.offset = ((128 - zero).float() * scale).contiguous()
        else:
            self.mode = "two_int4"
            op_group, scales, zeros = _group_views(qw)
            self.hi = _Int4Operand(qw.codes >> 4, scales * 16, (136 - zeros.float()) * scales, op_group)
            self.lo = _Int4Operand(qw.codes & 15, scales, torch.zeros_like(scales), op_group)

    def _matmul(self, xb, x_orig):
        if self.mode == "two_int4":
            return self.hi(xb).float().add_(self.lo(xb))
        y = torch.ops.aten._weight_int8pack_mm(xb, self.w8, self.scale)
        if self.offset is not None:
            y = y.float().addmm_(x_orig.float().sum(dim=-1, keepdim=True), self.offset.unsqueeze(0))
        return y

    def nbytes(self) -> int:
        if self.mode == "two_int4":
            return self.hi.nbytes() + self.lo.nbytes()
        return self.w8.numel() + self.scale.numel() * 2
