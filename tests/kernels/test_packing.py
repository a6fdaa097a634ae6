"""Bit packing: round trips for every width, the documented layout, and bad input."""

import pytest
import torch

import effalg.kernels as K


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("Kd", [1, 7, 8, 33, 64, 1153])
def test_round_trip(bits, Kd):
    codes = torch.randint(0, 2**bits, (5, Kd), dtype=torch.uint8)
    packed = K.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, K.packed_size(Kd, bits))
    assert packed.shape[-1] == (Kd * bits + 7) // 8
    assert torch.equal(K.unpack_bits(packed, bits, Kd), codes)


def test_layout_4bit_low_nibble_is_even_k():
    packed = K.pack_bits(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0x21, 0x43]]


def test_layout_3bit_little_endian_word():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert K.pack_bits(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]


def test_int4_symmetric_round_trip():
    q = torch.randint(-8, 8, (3, 10), dtype=torch.int8)
    assert torch.equal(K.unpack_int4_symmetric(K.pack_int4_symmetric(q), 10), q)


def test_bad_input():
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\)"):
        K.pack_bits(torch.zeros(2, 4, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="uint8"):
        K.pack_bits(torch.zeros(2, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="< 2\\*\\*4"):
        K.pack_bits(torch.full((2, 4), 16, dtype=torch.uint8), 4)
