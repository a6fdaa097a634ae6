"""Band attention ops (effalg.kernels.attention*): references, the fast CPU path, fake kernels, validation, Triton.

Both flavours of ``band_attention`` are covered: causal (MoA prefill) and non-causal (DiTFastAttn: a symmetric band
plus global tokens). The references are checked against an independent per-(row, head, query) loop over the mask rule
and against dense sdpa; the CPU kernels and the Triton kernels (under ``TRITON_INTERPRET=1`` on CPU, set in
tests/conftest.py) against the references. Decode is checked against prefill: a compact cache built from a full
sequence by the mask semantics (sinks plus the window, in a ring-buffer-permuted slot order) must give the prefill
output of the last row.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import effalg.kernels as ek
from effalg.kernels import attention_cpu
from effalg.kernels.attention_reference import band_attention_ref, band_decode_attention_ref, band_sink_mask

TOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = TOL[ref.dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


def _qkv(B, Hq, Hkv, L, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k, v


def _sees(i: int, j: int, p: int, w: int, s: int, causal: bool) -> bool:
    """The mask rule, written out for one (query, key) pair."""
    if i < p or j < p or (causal and j > i):
        return False
    return abs(i - j) < w or j - p < s or (not causal and i - p < s)


def _naive(q, k, v, window, sink, pad, scale, causal):
    """Independent per-(row, head, query) loop over the mask rule, in float64."""
    B, Hq, L, D = q.shape
    n_rep = Hq // k.shape[1]
    out = torch.zeros(B, Hq, L, D, dtype=torch.float64)
    for b in range(B):
        p = int(pad[b])
        for h in range(Hq):
            kv = h // n_rep
            w, s = int(window[kv]), int(sink[kv])
            for i in range(p, L):
                keys = [j for j in range(L) if _sees(i, j, p, w, s, causal)]
                sc = (k[b, kv, keys].double() @ q[b, h, i].double()) * scale
                out[b, h, i] = torch.softmax(sc, 0) @ v[b, kv, keys].double()
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Small CPU blocks so tiny sequences span several blocks (and L is not a multiple of the block)."""
    monkeypatch.setattr(attention_cpu, "PREFILL_BLOCK", 8)
    monkeypatch.setattr(attention_cpu, "BAND_BLOCK_MIN", 8)
    monkeypatch.setattr(attention_cpu, "BAND_BLOCK_MAX", 8)


# ------------------------------------------------------------------------------------------------------ reference

#: (window [Hkv=2], sink, pad [B=2]) on 13 tokens: a window >= L, no sinks, sinks >= L, an all-padding row.
RULES = [
    ([3, 20], [2, 1], [0, 4]),
    ([1, 5], [0, 0], [0, 0]),
    ([13, 30], [0, 4], [2, 13]),
    ([2, 4], [20, 0], [1, 0]),
]


@CAUSAL
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"w{r[0]}-s{r[1]}-p{r[2]}")
def test_reference_matches_naive_loop(causal, rule):
    q, k, v = _qkv(2, 4, 2, 13, 8, seed=1)
    window, sink, pad = (torch.tensor(x) for x in rule)
    y = band_attention_ref(q, k, v, window, sink, pad, 0.4, causal)
    torch.testing.assert_close(y.double(), _naive(q, k, v, window, sink, pad, 0.4, causal), rtol=1e-5, atol=1e-6)
    for b, p in enumerate(rule[2]):
        assert torch.equal(y[b, :, :p], torch.zeros_like(y[b, :, :p]))  # padding query rows


@pytest.mark.parametrize(
    "causal,expect",
    [
        (True, [[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0],
                [0, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1]]),
        # the global token (index 1) sees every real key; the others a band of +-1 plus the global token
        (False, [[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0],
                 [0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 1, 1], [0, 1, 0, 0, 1, 1]]),
    ],
    ids=["causal", "bidirectional"],
)  # fmt: skip
def test_mask_semantics_small_case(causal, expect):
    m = band_sink_mask(6, torch.tensor([2]), torch.tensor([1]), torch.tensor([1]), causal)[0, 0].int()
    assert torch.equal(m, torch.tensor(expect))


@CAUSAL
@pytest.mark.parametrize("impl", ["reference", "op"])
@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_long_windows_equal_dense_sdpa(causal, impl, n_rep, small_blocks):
    Hkv, L = 2, 21
    q, k, v = _qkv(2, Hkv * n_rep, Hkv, L, 16, seed=2)
    window, sink = torch.tensor([L, L + 5]), torch.tensor([0, 3])
    if impl == "reference":
        y = band_attention_ref(q, k, v, window, sink, torch.zeros(2, dtype=torch.long), 16**-0.5, causal)
    else:
        y = ek.band_attention(q, k, v, window, sink, causal=causal)
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1), is_causal=causal
    )
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CPU prefill / decode


@CAUSAL
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_cpu_prefill_matches_reference(causal, dtype, n_rep, small_blocks):
    Hkv, L = 4, 37
    q, k, v = _qkv(2, Hkv * n_rep, Hkv, L, 16, dtype, seed=3 + n_rep)
    g = torch.Generator().manual_seed(n_rep)
    window = torch.randint(1, L + 4, (Hkv,), generator=g)
    window[0] = window[2]  # a group of non-adjacent KV heads sharing a rule
    sink = torch.randint(0, 5, (Hkv,), generator=g)
    sink[0] = sink[2]
    pad = torch.tensor([0, 9])
    y = ek.band_attention(q, k, v, window, sink, pad, scale=0.3, causal=causal)
    _close(y, band_attention_ref(q, k, v, window, sink, pad, 0.3, causal))


@CAUSAL
@pytest.mark.parametrize("L", [16, 29])
@pytest.mark.parametrize("window", [1, 4, 9, 40])
@pytest.mark.parametrize("sink", [0, 3, 12])
def test_cpu_prefill_grid(causal, L, window, sink, small_blocks):
    q, k, v = _qkv(2, 4, 2, L, 8, seed=L + window + sink)
    w, s, pad = torch.tensor([window, window + 3]), torch.tensor([sink, sink // 2]), torch.tensor([0, 5])
    y = ek.band_attention(q, k, v, w, s, pad, causal=causal)
    _close(y, band_attention_ref(q, k, v, w, s, pad, 8**-0.5, causal))


@CAUSAL
@pytest.mark.parametrize("window,sink", [(1, 0), (1, 3), (5, 30), (8, 8), (100, 2)])
def test_cpu_prefill_edge_rules(causal, window, sink, small_blocks):
    q, k, v = _qkv(3, 2, 1, 19, 8, seed=7)
    pad = torch.tensor([0, 18, 19])
    y = ek.band_attention(q, k, v, window, sink, pad, causal=causal)  # python ints for every KV head
    w, s = torch.tensor([window]), torch.tensor([sink])
    _close(y, band_attention_ref(q, k, v, w, s, pad, 8**-0.5, causal))
    assert torch.equal(y[2], torch.zeros_like(y[2]))  # all-padding row


@CAUSAL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_prefill_default_blocks(causal, dtype):
    w = 70
    L = (attention_cpu.PREFILL_BLOCK if causal else 3 * attention_cpu.band_block(w)) + 45
    q, k, v = _qkv(1, 2, 1, L, 8, dtype, seed=8)
    s, pad = torch.tensor([4]), torch.tensor([3])
    y = ek.band_attention(q, k, v, w, s, pad, causal=causal)
    _close(y, band_attention_ref(q, k, v, torch.tensor([w]), s, pad, 8**-0.5, causal))


def test_band_block_follows_the_window():
    assert [attention_cpu.band_block(w) for w in (1, 513, 1025, 2049, 10**6)] == [64, 64, 128, 256, 256]


def test_cpu_bidirectional_cost_scales_with_the_band(monkeypatch):
    """Every non-global block attends to at most ``block + 2 * (window - 1) + sink`` keys; only the global rows
    see all ``L``."""
    calls = []
    real = attention_cpu._block_attention

    def spy(q, k, v, mask, scale):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, mask, scale)

    monkeypatch.setattr(attention_cpu, "_block_attention", spy)
    L, w, s = 1000, 33, 5
    m = attention_cpu.band_block(w)
    q, k, v = _qkv(1, 2, 2, L, 8, seed=9)
    ek.band_attention(q, k, v, w, s)
    assert calls[0] == (s, L)  # the global rows
    assert len(calls) == 1 + -(-(L - s) // m)
    assert max(n for _, n in calls[1:]) <= m + 2 * (w - 1) + s


def _compact_cache(k, v, window, sink, pad, i, capacity_extra=0, seed=0):
    """Compact cache for the query at index ``i`` from full ``k, v [B, Hkv, L, D]``: per KV head the live keys
    (sinks + window) in a random (ring-buffer-like) slot order, padded to capacity ``sink + window + extra``."""
    B, Hkv, L, D = k.shape
    g = torch.Generator().manual_seed(seed)
    cap = [int(sink[h]) + int(window[h]) + capacity_extra for h in range(Hkv)]
    head_start = torch.tensor([0] + cap).cumsum(0)
    T = int(head_start[-1])
    kc = torch.randn(B, T, D, generator=g).to(k.dtype)  # garbage in dead slots
    vc = torch.randn(B, T, D, generator=g).to(k.dtype)
    length = torch.zeros(B, Hkv, dtype=torch.long)
    for b in range(B):
        p = int(pad[b])
        for h in range(Hkv):
            w, s = int(window[h]), int(sink[h])
            keys = [j for j in range(p, i + 1) if i - j < w or j - p < s]
            perm = torch.randperm(len(keys), generator=g)
            keys = torch.tensor(keys, dtype=torch.long)[perm]
            st = int(head_start[h])
            kc[b, st : st + len(keys)] = k[b, h, keys]
            vc[b, st : st + len(keys)] = v[b, h, keys]
            length[b, h] = len(keys)
    return kc, vc, head_start, length


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_decode_equals_prefill_last_row(dtype, n_rep):
    Hkv, L, D = 3, 23, 16
    q, k, v = _qkv(2, Hkv * n_rep, Hkv, L, D, dtype, seed=10 + n_rep)
    window, sink, pad = torch.tensor([4, 9, 30]), torch.tensor([2, 0, 1]), torch.tensor([0, 6])
    pre = band_attention_ref(q, k, v, window, sink, pad, 0.25, True)
    for i in (L - 1, 12):
        kc, vc, hs, length = _compact_cache(k, v, window, sink, pad, i, capacity_extra=2, seed=i)
        qd = q[:, :, i].contiguous()
        ref = band_decode_attention_ref(qd, kc, vc, hs, length, 0.25)
        _close(ref, pre[:, :, i])
        _close(ek.band_decode_attention(qd, kc, vc, hs, length, scale=0.25), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_decode_matches_reference_ragged(dtype):
    """Runs of equal capacity, lengths below capacity and zero lengths (zeros out)."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, n_rep, D = 2, 5, 2, 16
    cap = [6, 6, 9, 0, 6]
    hs = torch.tensor([0] + cap).cumsum(0)
    T = int(hs[-1])
    q = torch.randn(B, Hkv * n_rep, D, generator=g).to(dtype)
    kc = torch.randn(B, T, D, generator=g).to(dtype)
    vc = torch.randn(B, T, D, generator=g).to(dtype)
    length = torch.tensor([[6, 2, 9, 0, 0], [6, 6, 1, 0, 6]])
    y = ek.band_decode_attention(q, kc, vc, hs, length)
    _close(y, band_decode_attention_ref(q, kc, vc, hs, length, D**-0.5))
    assert torch.equal(y[0, 6:10], torch.zeros_like(y[0, 6:10]))
    full = torch.tensor([[6, 6, 9, 0, 6]] * B)  # all segments full: the unmasked path
    _close(ek.band_decode_attention(q, kc, vc, hs, full), band_decode_attention_ref(q, kc, vc, hs, full, D**-0.5))


# ---------------------------------------------------------------------------------------------- fake kernels


@CAUSAL
def test_opcheck(causal):
    q, k, v = _qkv(2, 4, 2, 11, 8, seed=12)
    args = (q, k, v, torch.tensor([3, 5]), torch.tensor([1, 0]), torch.tensor([0, 2]), 0.3, causal)
    torch.library.opcheck(torch.ops.effalg.band_attention.default, args)
    kc, vc, hs, length = _compact_cache(k, v, torch.tensor([3, 5]), torch.tensor([1, 0]), torch.tensor([0, 2]), 10)
    torch.library.opcheck(torch.ops.effalg.band_decode_attention.default, (q[:, :, -1], kc, vc, hs, length, 0.3))


@CAUSAL
def test_fake_kernel_shapes(causal):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 6, 1000, 72), torch.empty(2, 3, 1000, 72), torch.empty(2, 3, 1000, 72)
        idx = torch.ones(3, dtype=torch.long)
        y = torch.ops.effalg.band_attention(q, k, v, idx, idx, torch.zeros(2, dtype=torch.long), 0.1, causal)
        assert y.shape == (2, 6, 1000, 72) and y.dtype == q.dtype
        yd = torch.ops.effalg.band_decode_attention(
            torch.empty(2, 6, 72), torch.empty(2, 90, 72), torch.empty(2, 90, 72), torch.tensor([0, 30, 60, 90]),
            torch.zeros(2, 3, dtype=torch.long), 0.1,
        )  # fmt: skip
        assert yd.shape == (2, 6, 72)


@CAUSAL
@pytest.mark.parametrize("as_int", [False, True], ids=["tensor_rule", "int_rule"])
def test_compile_fullgraph_uses_fake_kernels(causal, as_int):
    q, k, v = _qkv(1, 4, 2, 9, 8, seed=13)
    w, s, pad = (3, 1, torch.tensor([1])) if as_int else (torch.tensor([3, 4]), torch.tensor([1, 0]), torch.tensor([1]))

    def f(q, k, v):
        return ek.band_attention(q, k, v, w, s, pad, causal=causal) * 2

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    _close(y, f(q, k, v))


def test_compile_fullgraph_decode_uses_fake_kernel():
    q, k, v = _qkv(1, 4, 2, 9, 8, seed=13)
    kc, vc, hs, length = _compact_cache(k, v, torch.tensor([3, 4]), torch.tensor([1, 0]), torch.tensor([1]), 8)
    qd = q[:, :, -1].contiguous()

    def g(q):
        return ek.band_decode_attention(q, kc, vc, hs, length) + 1

    _close(torch.compile(g, backend="aot_eager", fullgraph=True)(qd), g(qd))


# ---------------------------------------------------------------------------------------------- bad input


@CAUSAL
def test_band_attention_bad_inputs(causal):
    q, k, v = _qkv(2, 4, 2, 6, 8)
    w, s = torch.tensor([2, 3]), torch.tensor([0, 1])

    def f(*args, **kwargs):
        return ek.band_attention(*args, causal=causal, **kwargs)

    f(q, k, v, w)  # valid: sink defaults to 0
    with pytest.raises(ValueError, match="q must be 4-D"):
        f(q[0], k, v, w, s)
    with pytest.raises(ValueError, match="k must have shape"):
        f(q, k[:, :, :5], v, w, s)
    with pytest.raises(ValueError, match="v must have"):
        f(q, k, v[..., :4], w, s)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        f(q[:, :3], k, v, w, s)
    with pytest.raises(TypeError, match="k and v must have q's dtype"):
        f(q, k.half(), v, w, s)
    with pytest.raises(TypeError, match="q must be float32"):
        f(q.double(), k, v, w, s)
    with pytest.raises(ValueError, match="window must have shape"):
        f(q, k, v, torch.tensor([2]), s)
    with pytest.raises(TypeError, match="window must be an int64"):
        f(q, k, v, w.float(), s)
    with pytest.raises(ValueError, match="window must be >= 1"):
        f(q, k, v, torch.tensor([0, 3]), s)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        f(q, k, v, 0, s)
    with pytest.raises(TypeError, match=r"window must be an int or an int64 tensor \[Hkv=2\], got float"):
        f(q, k, v, 2.0, s)
    with pytest.raises(TypeError, match="window must be an int or an int64 tensor"):
        f(q, k, v, True, s)
    with pytest.raises(ValueError, match="sink must be >= 0"):
        f(q, k, v, w, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="sink must be >= 0, got -2"):
        f(q, k, v, w, -2)
    with pytest.raises(ValueError, match=r"sink must have shape \(2,\)"):
        f(q, k, v, w, torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError, match="sink must be an int or an int64 tensor"):
        f(q, k, v, w, [1, 1])
    with pytest.raises(TypeError, match="causal must be a bool, got int"):
        ek.band_attention(q, k, v, w, s, causal=1)
    with pytest.raises(ValueError, match="pad must lie in"):
        f(q, k, v, w, s, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="pad must have shape"):
        f(q, k, v, w, s, torch.tensor([0]))
    with pytest.raises(ValueError, match="scale must be a finite"):
        f(q, k, v, w, s, scale=float("nan"))


def test_band_decode_attention_bad_inputs():
    q = torch.randn(2, 4, 8)
    kc, vc = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    hs, length = torch.tensor([0, 4, 10]), torch.tensor([[4, 6], [1, 0]])
    f = ek.band_decode_attention
    f(q, kc, vc, hs, length)  # valid
    with pytest.raises(ValueError, match="k_cache must have shape"):
        f(q, kc[..., :4], vc, hs, length)
    with pytest.raises(ValueError, match="v_cache must have"):
        f(q, kc, vc[:, :9], hs, length)
    with pytest.raises(TypeError, match="k_cache and v_cache must have q's dtype"):
        f(q, kc.bfloat16(), vc, hs, length)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        f(q, kc, vc, torch.tensor([0, 3, 6, 10]), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="head_start must be non-decreasing"):
        f(q, kc, vc, torch.tensor([0, 11, 10]), length)
    with pytest.raises(ValueError, match="head_start must start at 0 and end at T=10"):
        f(q, kc, vc, torch.tensor([0, 4, 9]), length)
    with pytest.raises(ValueError, match="head_start must be a 1-D"):
        f(q, kc, vc, torch.tensor([[0, 4, 10]]), length)
    with pytest.raises(ValueError, match="length exceeds the segment capacity"):
        f(q, kc, vc, hs, torch.tensor([[5, 6], [1, 0]]))
    with pytest.raises(ValueError, match="length must be >= 0"):
        f(q, kc, vc, hs, torch.tensor([[-1, 6], [1, 0]]))
    with pytest.raises(ValueError, match="length must have shape"):
        f(q, kc, vc, hs, torch.tensor([4, 6]))


# ---------------------------------------------------------------------------------------------- Triton


def _triton():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from effalg.kernels import triton as tk

    if not tk.HAS_TRITON:
        pytest.skip("triton is installed but does not import")
    from effalg.kernels.triton import band_attention

    return band_attention


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_TOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}


def _close_scaled(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Within one unit in the last place of the output dtype, relative to ``max|ref|``."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    s = ref.float().abs().max().clamp(min=1e-6)
    tol = TRITON_TOL[ref.dtype]
    torch.testing.assert_close(y.float().cpu() / s, ref.float().cpu() / s, rtol=tol, atol=tol)


@CAUSAL
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_prefill_matches_reference(causal, dtype):
    ba = _triton()
    # 16-wide tiles (the fp16/bf16 tl.dot floor on GPUs) over 53 tokens: several sink and band tiles per program;
    # D = 8 is padded to the 16-wide head tile.
    q, k, v = _qkv(2, 4, 2, 53, 8, dtype, seed=20)
    window, sink, pad = torch.tensor([3, 30]), torch.tensor([18, 1]), torch.tensor([0, 6])
    ref = band_attention_ref(q, k, v, window, sink, pad, 0.3, causal)
    dev = [t.to(TRITON_DEVICE) for t in (q, k, v, window, sink, pad)]
    y = ba.triton_band_attention(*dev, 0.3, causal, block_m=16, block_n=16)
    _close_scaled(y, ref)
    assert torch.equal(y[1, :, :6].cpu(), torch.zeros_like(y[1, :, :6].cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_bidirectional_global_rows_and_padding(dtype):
    ba = _triton()
    # Non-causal edge cases at 16-wide tiles over 45 tokens: the padding (3 and 21) ends inside a query block, the
    # global rows span two blocks (row 1: tokens 21..40), no global tokens and a window covering the row.
    q, k, v = _qkv(2, 3, 3, 45, 16, dtype, seed=24)
    window, sink, pad = torch.tensor([2, 5, 50]), torch.tensor([20, 0, 3]), torch.tensor([3, 21])
    ref = band_attention_ref(q, k, v, window, sink, pad, 0.25, False)
    dev = [t.to(TRITON_DEVICE) for t in (q, k, v, window, sink, pad)]
    y = ba.triton_band_attention(*dev, 0.25, False, block_m=16, block_n=16)
    _close_scaled(y, ref)
    assert torch.equal(y[1, :, :21].cpu(), torch.zeros_like(y[1, :, :21].cpu()))


@CAUSAL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prefill_production_blocks(causal, dtype):
    ba = _triton()
    q, k, v = _qkv(1, 2, 1, 150, 64, dtype, seed=22)  # the default 64-wide tiles (32 for fp32), ragged L
    window, sink, pad = torch.tensor([40]), torch.tensor([4]), torch.tensor([0])
    ref = band_attention_ref(q, k, v, window, sink, pad, 0.125, causal)
    dev = [t.to(TRITON_DEVICE) for t in (q, k, v, window, sink, pad)]
    _close_scaled(ba.triton_band_attention(*dev, 0.125, causal), ref)


def test_triton_prefill_rejects_tiles_a_gpu_cannot_compile():
    ba = _triton()
    q, k, v = _qkv(1, 2, 1, 20, 16, torch.bfloat16, seed=23)
    one = torch.tensor([4])
    with pytest.raises(ValueError, match="band_attention: block_n=8 must be a power of two >= 16"):
        ba.triton_band_attention(q, k, v, one, one, torch.tensor([0]), 0.25, False, block_n=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_matches_reference(dtype, num_splits):
    ba = _triton()
    Hkv, L, D = 2, 17, 8
    q, k, v = _qkv(2, 2 * Hkv, Hkv, L, D, dtype, seed=21)
    window, sink, pad = torch.tensor([4, 9]), torch.tensor([2, 0]), torch.tensor([0, 3])
    kc, vc, hs, length = _compact_cache(k, v, window, sink, pad, L - 1, capacity_extra=1, seed=3)
    length[1, 1] = 0  # an empty segment outputs zeros
    qd = q[:, :, -1].contiguous()
    ref = band_decode_attention_ref(qd, kc, vc, hs, length, 0.3)
    dev = [t.to(TRITON_DEVICE) for t in (qd, kc, vc, hs, length)]
    y = ba.triton_band_decode_attention(*dev, 0.3, block_n=2, num_splits=num_splits)
    _close_scaled(y, ref)
    assert torch.equal(y[1, 2:].cpu(), torch.zeros_like(y[1, 2:].cpu()))


def test_triton_register_installs_cuda_kernels():
    _triton()
    # In a subprocess (the dispatcher registry is process-global): pretend CUDA is present; nothing runs on CUDA.
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "import effalg.kernels.triton as t\n"
        "assert t.register() is True\n"
        "for op in ('band_attention', 'band_decode_attention'):\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key(f'effalg::{op}', 'CUDA'), op\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
