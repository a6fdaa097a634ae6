import torch

from effalg.kernels.reference import int8_scaled_mm_ref, quantize_per_token_ref


def test_quantize_small_known():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_per_token_ref(x)
    assert torch.allclose(s, torch.tensor([[1 / 127], [1e-8 / 127]]))
    assert q.tolist()[0] == [127, round(-63.5), round(31.75), 0]  # python round is half-to-even: -64
    assert q.tolist()[1] == [0, 0, 0, 0]


def test_quantize_grouped_matches_rowwise_on_groups():
    x = torch.randn(3, 64)
    q, s = quantize_per_token_ref(x, 16)
    q2, s2 = quantize_per_token_ref(x.reshape(12, 16))
    assert torch.equal(q.reshape(12, 16), q2) and torch.equal(s.reshape(12, 1), s2)


def test_int8_mm_ref_exact():
    a = torch.randint(-128, 128, (5, 33), dtype=torch.int8)
    w = torch.randint(-128, 128, (7, 33), dtype=torch.int8)
    acc = (a.to(torch.int64)[:, None, :] * w.to(torch.int64)[None]).sum(-1)
    y = int8_scaled_mm_ref(a, torch.ones(5, 1), w, torch.ones(7), None, torch.float64)
    assert torch.equal(y, acc.to(torch.float64))
