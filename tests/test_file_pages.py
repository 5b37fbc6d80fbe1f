"""page_out: the pages of a weight mapped from a file leave resident memory, and nothing is lost."""
from __future__ import annotations

import sys

import pytest
import torch

from hf_autoround.file_pages import file_mapping_of, page_out

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / /proc are Linux-only")


def resident_kib(tensor: torch.Tensor) -> int:
    """Rss of the mapping that holds ``tensor`` (from /proc/self/smaps)."""
    address, found = tensor.untyped_storage().data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                found = low <= address < high
            elif found and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


def filesystem_of(path) -> str:
    best, fstype = "", ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, kind = line.split()[:3]
            if str(path).startswith(point) and len(point) > len(best):
                best, fstype = point, kind
    return fstype


def mapped_weight(tmp_path, n=1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    if filesystem_of(tmp_path) in ("tmpfs", "ramfs"):  # its pages are memory: reclaiming them needs swap
        pytest.skip(f"{tmp_path} is on a memory filesystem")
    values = torch.randn(n)
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    return torch.from_file(str(path), shared=False, size=n, dtype=torch.float32), values


def test_file_mapped_weight_leaves_memory_and_reads_back_the_same(tmp_path):
    weight, values = mapped_weight(tmp_path)
    assert file_mapping_of(weight.data_ptr(), weight.data_ptr() + 4 * weight.numel()).endswith("weights.bin")
    assert float(weight.sum()) == pytest.approx(float(values.sum()), rel=1e-4)  # every page read
    before = resident_kib(weight)
    assert before >= 4000
    assert page_out(weight) >= 4 * weight.numel() - 8192  # whole pages inside the tensor
    assert resident_kib(weight) < before / 4
    assert torch.equal(weight, values)  # read back from the file


def test_pages_written_since_the_load_are_kept(tmp_path):
    weight, values = mapped_weight(tmp_path)
    weight[:1000] = 7.0  # private copies of the first page(s)
    page_out(weight)
    assert bool((weight[:1000] == 7.0).all()) and torch.equal(weight[1000:], values[1000:])


def test_anonymous_memory_is_left_alone():
    weight = torch.randn(1 << 20)
    assert page_out(weight) == 0
    assert file_mapping_of(weight.data_ptr(), weight.data_ptr() + 4) is None


def test_packing_a_layer_pages_out_its_file_mapped_float_weight(tmp_path):
    from hf_autoround.qdq import quantize_weight
    from hf_autoround.quantize import pack_layer
    from hf_autoround.scheme import QuantScheme

    flat, _ = mapped_weight(tmp_path, n=256 * 4096)
    weight = flat.view(256, 4096)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 256, bias=False))
    model[0].weight = torch.nn.Parameter(weight, requires_grad=False)
    qw = quantize_weight(weight, QuantScheme(4, 128, True))  # reads every page
    before = resident_kib(weight)
    assert before >= 3000
    pack_layer(model, "0", qw, "auto_round")
    assert resident_kib(weight) < before / 4
