import math

import numpy as np
import pytest
import torch

from effalg.core.metrics import cosine_similarity, kl_divergence, mse, psnr, relative_l2, sqnr, ssim


def test_sqnr_hand_value():
    ref = torch.tensor([3.0, 4.0])  # signal 25
    x = torch.tensor([3.0, 3.0])  # noise 1
    assert sqnr(ref, x) == pytest.approx(10 * math.log10(25))
    assert sqnr(ref, ref) == math.inf
    assert sqnr(np.array([1.0, 1.0]), np.array([1.1, 0.9])) == pytest.approx(10 * math.log10(2 / 0.02))


def test_relative_l2_and_cosine():
    ref = torch.tensor([3.0, 4.0])
    assert relative_l2(ref, torch.tensor([3.0, 3.0])) == pytest.approx(1 / 5)
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine_similarity(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(-1.0)
    assert mse(ref, torch.tensor([1.0, 4.0])) == pytest.approx(2.0)


def test_kl_divergence_hand_value():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    x = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]])) + 3.0  # logits: a constant shift changes nothing
    want = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)) / 2
    assert kl_divergence(ref, x) == pytest.approx(want)
    assert kl_divergence(ref, ref) == 0.0
    with pytest.raises(ValueError, match="ref_logits and logits"):
        kl_divergence(ref, x[:1])


def test_psnr_hand_value():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.1)
    assert psnr(a, b, data_range=1.0) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert psnr(a.numpy(), (a + 25.5).numpy(), data_range=255) == pytest.approx(20.0)
    assert psnr(a, a) == math.inf


def test_ssim_constant_images_closed_form():
    # Constant images: variances are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) (the C2 term cancels).
    a, b = 0.2, 0.6
    img1 = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    img2 = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(img1, img2, data_range=1.0) == pytest.approx(expected, rel=1e-9)


def _ssim_loop(x, y, data_range, win=11, sigma=1.5):
    """Independent slow reference: explicit window sums at each valid position, grayscale 2D."""
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    w = np.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            px, py = x[i : i + win, j : j + win], y[i : i + win, j : j + win]
            mx, my = (w * px).sum(), (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_loop_reference_and_layouts():
    rng = np.random.default_rng(0)
    x = rng.random((20, 18))
    y = np.clip(x + 0.1 * rng.standard_normal((20, 18)), 0, 1)
    ref = _ssim_loop(x, y, 1.0)
    assert ssim(x, y, data_range=1.0) == pytest.approx(ref, rel=1e-9)
    assert 0.0 < ref < 1.0
    # [H, W, C] numpy and [B, C, H, W] torch give the same value (channel mean)
    hwc_x = np.stack([x, x * 0.5], axis=-1)
    hwc_y = np.stack([y, y * 0.5], axis=-1)
    v_hwc = ssim(hwc_x, hwc_y, data_range=1.0)
    v_bchw = ssim(torch.from_numpy(hwc_x).permute(2, 0, 1)[None], torch.from_numpy(hwc_y).permute(2, 0, 1)[None])
    assert v_hwc == pytest.approx(v_bchw, rel=1e-12)
    expected = (ref + _ssim_loop(x * 0.5, y * 0.5, 1.0)) / 2
    assert v_hwc == pytest.approx(expected, rel=1e-9)
    assert ssim(x, x) == pytest.approx(1.0)


def test_ssim_reduction_none_per_image():
    torch.manual_seed(0)
    a = torch.rand(2, 1, 12, 12)
    b = a.clone()
    b[1] = torch.rand(1, 12, 12)
    per = ssim(a, b, reduction="none")
    assert per.shape == (2,)
    assert per[0].item() == pytest.approx(1.0) and per[1].item() < 0.5


def test_metric_errors_name_arguments():
    with pytest.raises(ValueError, match="same shape"):
        sqnr(torch.zeros(3), torch.zeros(4))
    with pytest.raises(TypeError, match="ref must be"):
        sqnr([1.0], torch.zeros(1))
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(2), torch.zeros(2), data_range=0)
    with pytest.raises(ValueError, match="win_size"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="img_ref must be"):
        ssim(torch.zeros(2, 1, 1, 16, 16), torch.zeros(2, 1, 1, 16, 16))
