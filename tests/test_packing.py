import pytest
import torch

from quipkit.layers.packing import pack_bits, packed_length, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
@pytest.mark.parametrize("count", [1, 7, 8, 33, 576])
def test_round_trip_and_size(bits, count):
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    values = torch.randint(0, 2**bits, (3, count), generator=gen)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, packed_length(count, bits)) == (3, -(-count * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, count), values.to(torch.int32))


def test_bit_layout_is_little_endian_stream():
    # values 1 (01) and 2 (10) at 2 bits -> bits 1,0,0,1 -> byte 0b1001 = 9
    assert pack_bits(torch.tensor([1, 2]), 2).tolist() == [9]
    assert pack_bits(torch.tensor([5]), 3).tolist() == [5]
    assert pack_bits(torch.tensor([7, 7, 7]), 3).tolist() == [255, 1]
