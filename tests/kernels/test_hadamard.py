"""``effalg::smooth_hadamard``: reference vs an independent dense construction, CPU kernel and Triton (interpreter)
vs the reference, orthogonality, block sizes, bad inputs, and ``torch.compile`` tracing through the fake kernel.

Tolerances: outputs are compared after dividing by ``max|ref|`` at ``TOL[dtype]`` (fp32 1e-5; bf16 / fp16 two units
in the last place: the kernels compute in fp32 and round once, the reference in float64; the Triton interpreter
also truncates rather than rounds to bf16).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import effalg.kernels as K
from effalg.kernels import cpu, reference

TOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(shape, dtype=torch.float32, seed=0):
    Kd = shape[-1]
    x = (torch.randn(*shape, generator=_gen(seed)) * 2).to(dtype)
    smooth = torch.rand(Kd, generator=_gen(seed + 1)) * 3 + 0.25
    signs = torch.randint(0, 2, (Kd,), generator=_gen(seed + 2)).float() * 2 - 1
    return x, smooth, signs


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().clamp(min=1e-6)
    tol = TOL[ref.dtype]
    torch.testing.assert_close(y.float() / scale, ref.float() / scale, rtol=tol, atol=tol)


def _dense_rotation(Kd: int, b: int) -> torch.Tensor:
    """Block-diagonal normalized Hadamard built independently (Kronecker powers of [[1, 1], [1, -1]])."""
    H = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(int(math.log2(b))):
        H = torch.kron(H, h2)
    return torch.block_diag(*([H / math.sqrt(b)] * (Kd // b)))


# ------------------------------------------------------------------------------------------------------ helpers


def test_hadamard_block_size():
    assert K.hadamard_block_size(1152) == 128
    assert K.hadamard_block_size(4608) == 256
    assert K.hadamard_block_size(4096) == 256
    assert K.hadamard_block_size(72) == 8
    assert K.hadamard_block_size(7) == 1
    assert K.hadamard_block_size(4096, max_block=64) == 64
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match="K must be"):
            K.hadamard_block_size(bad)
    with pytest.raises(ValueError, match="max_block"):
        K.hadamard_block_size(64, max_block=48)


@pytest.mark.parametrize("b", [1, 2, 4, 32, 128])
def test_hadamard_matrices_sylvester_and_orthogonal(b):
    H = reference.hadamard_matrix_ref(b)
    torch.testing.assert_close(H @ H.t(), b * torch.eye(b, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(H / math.sqrt(b), _dense_rotation(b, b), rtol=0, atol=1e-15)
    torch.testing.assert_close(cpu.hadamard_matrix(b).double(), _dense_rotation(b, b), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("b", [0, 1, 4, 16])
def test_reference_matches_dense_rotation(b):
    x, smooth, signs = _inputs((5, 48), torch.float64)
    y = reference.smooth_hadamard_ref(x, smooth, signs, b)
    R = torch.eye(48, dtype=torch.float64) if b == 0 else _dense_rotation(48, b)
    expected = (x * smooth.double() * signs.double()) @ R
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b", [2, 8, 64])
def test_rotation_is_orthogonal(b):
    x, _, signs = _inputs((6, 128), torch.float32)
    y = K.smooth_hadamard(x, None, signs, b)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)  # norms preserved
    R = K.smooth_hadamard(torch.eye(128), None, signs, b).double()  # rows of R
    torch.testing.assert_close(R @ R.t(), torch.eye(128, dtype=torch.float64), rtol=0, atol=1e-6)
    # H_b / sqrt(b) is an involution: rotating twice (no signs) is the identity.
    torch.testing.assert_close(
        K.smooth_hadamard(K.smooth_hadamard(x, None, None, b), None, None, b), x, rtol=0, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("b", [0, 1, 2, 8, 32])
@pytest.mark.parametrize("which", ["both", "smooth", "signs", "none"])
def test_cpu_matches_reference(dtype, b, which):
    x, smooth, signs = _inputs((2, 5, 96), dtype, seed=3)
    smooth = smooth if which in ("both", "smooth") else None
    signs = signs if which in ("both", "signs") else None
    y = K.smooth_hadamard(x, smooth, signs, b)  # dispatches to the registered CPU kernel
    assert torch.equal(y, cpu.smooth_hadamard_cpu(x, smooth, signs, b))
    _close(y, reference.smooth_hadamard_ref(x, smooth, signs, b))


@pytest.mark.parametrize("b", [64, 128, 256, 512, 2048])
def test_cpu_factored_large_blocks_match_reference(b):
    # Blocks above 64 run as Kronecker factors (e.g. H_128 = H_8 (x) H_16): compare with the dense reference.
    x, smooth, signs = _inputs((3, 2 * b), torch.float32, seed=b)
    y = K.smooth_hadamard(x, smooth, signs, b)
    _close(y, reference.smooth_hadamard_ref(x, smooth, signs, b))
    _close(K.smooth_hadamard(x.bfloat16(), None, signs, b), reference.smooth_hadamard_ref(x.bfloat16(), None, signs, b))


def test_cpu_non_contiguous_and_empty():
    _, smooth, signs = _inputs((1, 64), torch.float32, seed=4)
    xt = torch.randn(64, 10, generator=_gen(4)).t()  # [10, 64], non-contiguous
    assert not xt.is_contiguous()
    _close(K.smooth_hadamard(xt, smooth, signs, 16), reference.smooth_hadamard_ref(xt.contiguous(), smooth, signs, 16))
    e = torch.empty(0, 32, dtype=torch.bfloat16)
    assert K.smooth_hadamard(e, None, None, 32).shape == (0, 32)


def test_smooth_only_computed_in_fp32():
    # bf16 x times an fp32 scale is rounded once (not x * bf16(scale)).
    x = torch.full((1, 4), 1.0 + 2.0**-7, dtype=torch.bfloat16)
    s = torch.full((4,), 1.0 + 2.0**-9)
    y = K.smooth_hadamard(x, s, None, 0)
    assert torch.equal(y, (x.double() * s.double()).to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------- bad arguments


def test_bad_inputs_name_the_argument():
    x, smooth, signs = _inputs((3, 64))
    with pytest.raises(TypeError, match="smooth_hadamard: x"):
        K.smooth_hadamard(x.to(torch.int32), smooth, signs, 8)
    with pytest.raises(TypeError, match="smooth_hadamard: x"):
        K.smooth_hadamard([1.0], None, None, 0)
    with pytest.raises(ValueError, match="smooth must have shape"):
        K.smooth_hadamard(x, smooth[:32], signs, 8)
    with pytest.raises(TypeError, match="smooth must have dtype"):
        K.smooth_hadamard(x, smooth.half(), signs, 8)
    with pytest.raises(ValueError, match="signs must have shape"):
        K.smooth_hadamard(x, smooth, signs[:10], 8)
    with pytest.raises(ValueError, match="signs must be 1-D"):
        K.smooth_hadamard(x, smooth, signs.reshape(8, 8), 8)
    with pytest.raises(ValueError, match=r"signs must contain only \+1 and -1"):
        K.smooth_hadamard(x, smooth, signs * 0.5, 8)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        K.smooth_hadamard(x, smooth, signs, 12)
    with pytest.raises(ValueError, match="block_size=128 must divide"):
        K.smooth_hadamard(x, smooth, signs, 128)
    for bad in (-1, True, 8.0):
        with pytest.raises(ValueError, match="block_size must be an int"):
            K.smooth_hadamard(x, smooth, signs, bad)
    with pytest.raises(ValueError, match="non-empty last dim"):
        K.smooth_hadamard(torch.empty(3, 0), None, None, 0)
    with pytest.raises(ValueError, match="signs is on cpu but the input is on meta"):
        K.smooth_hadamard(x.to("meta"), None, signs, 8)


# ------------------------------------------------------------------------------------------------ torch.compile


def test_opcheck_and_fake():
    x, smooth, signs = _inputs((4, 32), torch.bfloat16)
    torch.library.opcheck(torch.ops.effalg.smooth_hadamard.default, (x, smooth, signs, 16))
    torch.library.opcheck(torch.ops.effalg.smooth_hadamard.default, (x.float(), None, None, 0))
    y = torch.ops.effalg.smooth_hadamard(x.to("meta"), smooth.to("meta"), signs.to("meta"), 16)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype


def test_torch_compile_fullgraph_traces_op():
    x, smooth, signs = _inputs((2, 3, 64), torch.bfloat16, seed=5)

    def f(x):
        return K.smooth_hadamard(x, smooth, signs, 16).float().sum(-1)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, f(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- Triton (interpreter)

_HAS_TRITON = importlib.util.find_spec("triton") is not None
if _HAS_TRITON:
    from effalg.kernels import triton as tk

    _HAS_TRITON = tk.HAS_TRITON
needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed or does not import")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "b, tiles",
    [
        (0, dict(block_m=8, block_n=16)),  # ragged K (40) over several column tiles
        (16, dict(block_m=16, block_n=16, block_k=16)),
        (32, dict(block_m=8, block_n=16, block_k=8)),  # several tiles and K-steps per Hadamard block
        (8, dict(block_m=8, block_n=8, block_k=8)),
        (4, dict(block_m=8)),  # K tile 4: below the fp32 tl.dot floor, the multiply-reduce path
        (32, {}),
        (64, {}),  # the production tiles (64 x 64, K step 32)
    ],
)
def test_triton_matches_reference(dtype, b, tiles):
    Kd = 40 if b == 0 else 64
    x, smooth, signs = _inputs((3, 7, Kd), dtype, seed=6)
    x, smooth, signs = x.to(DEVICE), smooth.to(DEVICE), signs.to(DEVICE)
    for sm, sg in ((smooth, signs), (None, signs), (smooth, None), (None, None)):
        y = tk.triton_smooth_hadamard(x, sm, sg, b, **tiles)
        _close(y.cpu(), reference.smooth_hadamard_ref(x, sm, sg, b).cpu())


@needs_triton
def test_triton_non_contiguous_rows():
    x, smooth, signs = _inputs((9, 128), torch.float32, seed=7)
    xs = x[::2, :64]  # row stride 256, unit column stride
    y = tk.triton_smooth_hadamard(xs.to(DEVICE), smooth[:64].to(DEVICE), signs[:64].to(DEVICE), 16, block_m=8)
    _close(y.cpu(), reference.smooth_hadamard_ref(xs, smooth[:64], signs[:64], 16))
