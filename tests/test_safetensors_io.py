"""The tensor-by-tensor safetensors writer and reader: files the safetensors library reads back exactly, lazy
loading in order, atomic replacement that keeps the old file when a write fails."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_autoround.safetensors_io import TensorEntry, atomic_write, read_header, read_tensor, write_tensors


def sample() -> dict:
    torch.manual_seed(0)
    return {"w": torch.randn(3, 5), "b16": torch.randn(4, 2).to(torch.bfloat16), "h": torch.randn(7).half(),
            "q": torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32), "flag": torch.tensor([True, False]),
            "scalar": torch.tensor(3.5, dtype=torch.float64), "empty": torch.zeros(0, 4),
            "u8": torch.arange(9, dtype=torch.uint8)}


def test_written_files_read_back_exactly_by_safetensors_and_by_us(tmp_path):
    tensors, order = sample(), []
    entries = [TensorEntry(k, t.dtype, tuple(t.shape), (lambda k=k, t=t: (order.append(k), t)[1]))
               for k, t in tensors.items()]
    write_tensors(str(tmp_path / "a.safetensors"), entries, {"format": "pt"})
    assert order == list(tensors)  # each loaded once, when written
    back = load_file(tmp_path / "a.safetensors")
    assert back.keys() == tensors.keys()
    stored, metadata = read_header(str(tmp_path / "a.safetensors"))
    assert metadata == {"format": "pt"}
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
        assert torch.equal(read_tensor(stored[key]), t), key
        assert torch.equal(read_tensor(stored[key], own_mapping=True), t), key
    save_file(tensors, tmp_path / "lib.safetensors")  # and we read what the library writes
    theirs, _ = read_header(str(tmp_path / "lib.safetensors"))
    assert all(torch.equal(read_tensor(theirs[k]), t) for k, t in tensors.items())


def test_a_loader_giving_the_wrong_tensor_is_refused(tmp_path):
    entry = TensorEntry("w", torch.float32, (2, 2), lambda: torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected torch.float32 \\[2, 2\\]"):
        write_tensors(str(tmp_path / "x.safetensors"), [entry])


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(str(path), broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]
    atomic_write(str(path), lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"


def test_truncated_file_is_refused(tmp_path):
    write_tensors(str(tmp_path / "t.safetensors"), [TensorEntry.of("w", torch.ones(64))])
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-8])
    stored, _ = read_header(str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match="truncated"):
        read_tensor(stored["w"])
