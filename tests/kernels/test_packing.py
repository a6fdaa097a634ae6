import pytest
import torch

from effalg.kernels import (
    pack_bits,
    pack_int2_symmetric,
    pack_int4_symmetric,
    unpack_bits,
    unpack_int2_symmetric,
    unpack_int4_symmetric,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [1, 7, 8, 13, 64, 1153])
def test_roundtrip(bits, K):
    g = torch.Generator().manual_seed(K * 10 + bits)
    codes = torch.randint(0, 2**bits, (3, 5, K), generator=g, dtype=torch.uint8)
    p = pack_bits(codes, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, (K * bits + 7) // 8)
    assert torch.equal(unpack_bits(p, bits, K), codes)


def test_layout_little_endian():
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit: codes 0..7 -> 24-bit word sum(j << 3j)
    word = sum(j << (3 * j) for j in range(8))
    assert pack_bits(torch.arange(8, dtype=torch.uint8), 3).tolist() == [word & 255, (word >> 8) & 255, word >> 16]


def test_int4_symmetric():
    q = torch.randint(-8, 8, (4, 10), dtype=torch.int8)
    p = pack_int4_symmetric(q)
    assert torch.equal(unpack_bits(p, 4, 10).to(torch.int16) - 8, q.to(torch.int16))
    assert torch.equal(unpack_int4_symmetric(p, 10), q)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="codes"):
        pack_bits(torch.zeros(4, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="codes"):
        pack_bits(torch.full((4,), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="packed"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)


def test_int2_symmetric():
    for K in (1, 5, 8, 13, 64):
        q = torch.randint(-2, 2, (4, K), dtype=torch.int8, generator=torch.Generator().manual_seed(K))
        p = pack_int2_symmetric(q)
        assert p.shape == (4, (K + 3) // 4)
        assert torch.equal(p, pack_bits((q + 2).to(torch.uint8), 2))  # same layout as the generic 2-bit packing
        assert torch.equal(unpack_int2_symmetric(p, K), q)
    # code k at bits 2 * (k % 4): q = [-2, -1, 0, 1] -> u = [0, 1, 2, 3] -> 0b11_10_01_00
    assert pack_int2_symmetric(torch.tensor([-2, -1, 0, 1], dtype=torch.int8)).tolist() == [0b11100100]
    with pytest.raises(ValueError, match=r"q must be in \[-2, 1\]"):
        pack_int2_symmetric(torch.tensor([2], dtype=torch.int8))
    with pytest.raises(TypeError, match="q must be int8"):
        pack_int2_symmetric(torch.tensor([0], dtype=torch.uint8))
