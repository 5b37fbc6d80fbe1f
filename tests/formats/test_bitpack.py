import pytest
import torch

from hf_autoround.formats.bitpack import pack_last_dim, unpack_last_dim


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (7, 96), (5, 4, 128), (2, 576)])
def test_round_trip_is_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + shape[-1])
    values = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    words = pack_last_dim(values, bits)
    assert words.dtype == torch.int32
    assert words.shape[-1] == shape[-1] * bits // 32
    assert torch.equal(unpack_last_dim(words, bits, shape[-1]), values)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_values_round_trip(bits):
    for fill in (0, 2**bits - 1):
        values = torch.full((2, 32), fill, dtype=torch.int32)
        assert torch.equal(unpack_last_dim(pack_last_dim(values, bits), bits, 32), values)


def test_bit_positions_follow_the_stream_layout():
    # 4-bit: element k sits at bits 4k of the word; 0x77777777 is eight sevens
    assert pack_last_dim(torch.full((1, 8), 7), 4).item() == 0x77777777
    assert pack_last_dim(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]]), 4).item() == 1
    assert pack_last_dim(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]]), 4).item() == -(2**28)  # 0xF0000000 as int32
    # 3-bit: value 10 straddles words 0 and 1 (bits 30..32)
    values = torch.zeros(1, 32, dtype=torch.int32)
    values[0, 10] = 0b111
    words = pack_last_dim(values, 3)
    assert words[0, 0].item() == -(2**31) + 2**30  # bits 30, 31 set
    assert words[0, 1].item() == 1 and words[0, 2].item() == 0


def test_rejects_out_of_range_and_ragged_input():
    with pytest.raises(ValueError, match="out of range"):
        pack_last_dim(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack_last_dim(torch.zeros(1, 20, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_last_dim(torch.zeros(1, 3, dtype=torch.int32), 4, 32)
