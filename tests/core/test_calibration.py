import pytest
import torch
from torch import nn

from effalg.core.calibration import ActivationStatsCollector, CalibrationStats, calibrate


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x, img=None):
        y = self.fc2(torch.relu(self.fc1(x)))
        if img is not None:
            self.conv(img)
        return y


def test_per_call_absmax_and_running_max():
    net = _Net()
    xs = [torch.randn(3, 5, 4) * (i + 1) for i in range(4)]
    with ActivationStatsCollector(net) as col:
        for x in xs:
            net(x)
    stats = col.stats()
    assert set(stats) == {"fc1", "fc2"}  # default: all nn.Linear
    s = stats["fc1"]
    expected = torch.stack([x.abs().reshape(-1, 4).amax(0) for x in xs])
    assert torch.equal(s.per_call, expected)
    assert torch.equal(s.absmax, expected.amax(0))
    assert s.num_calls == 4 and s.calls_per_entry.tolist() == [1, 1, 1, 1]
    assert torch.equal(s.tensor_min, torch.tensor([float(x.min()) for x in xs]))
    assert s.per_call.dtype == torch.float32 and s.per_call.device.type == "cpu"
    # hooks removed on exit
    assert not net.fc1._forward_pre_hooks


def test_max_calls_merges_by_max():
    lin = nn.Linear(2, 2)
    xs = [torch.tensor([[float(i), -float(10 - i)]]) for i in range(7)]
    with ActivationStatsCollector(modules={"lin": lin}, max_calls=3) as col:
        for x in xs:
            lin(x)
    s = col.stats()["lin"]
    assert s.per_call.shape[0] <= 3
    assert int(s.calls_per_entry.sum()) == 7
    # Each entry is the max over its consecutive calls.
    start = 0
    for row, n in zip(s.per_call, s.calls_per_entry.tolist()):
        ref = torch.stack([x.abs()[0] for x in xs[start : start + n]]).amax(0)
        assert torch.equal(row, ref)
        start += n
    assert torch.equal(s.absmax, torch.tensor([6.0, 10.0]))


def test_conv_channels_and_histogram_and_selection():
    net = _Net()
    img = torch.randn(2, 2, 3, 3)
    img[:, 1] *= 100
    with ActivationStatsCollector(net, ["conv"], histogram_bins=8, histogram_range=1.0) as col:
        net(torch.randn(1, 4), img)
    s = col.stats()["conv"]
    assert torch.equal(s.absmax, img.abs().amax(dim=(0, 2, 3)))
    assert s.histogram.sum().item() == img.numel()
    assert s.histogram_range >= img.abs().max().item() and s.histogram.shape == (8,)
    with pytest.raises(ValueError, match=r"not in the model.*\['nope'\]"):
        ActivationStatsCollector(net, ["nope"])
    with pytest.raises(ValueError, match="max_calls"):
        ActivationStatsCollector(net, max_calls=0)


def test_calibrate_and_save_load(tmp_path):
    net = _Net()
    inputs = [torch.randn(2, 4) for _ in range(3)]
    calls = []

    def run(x):
        calls.append(torch.is_grad_enabled())
        net(x)

    stats = calibrate(run, inputs, model=net, desc="test", disable_progress=True)
    assert calls == [False, False, False]
    assert isinstance(stats, CalibrationStats) and set(stats) == {"fc1", "fc2"}
    assert stats["fc1"].num_calls == 3
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = CalibrationStats.load(path)
    for name in stats:
        a, b = stats[name], loaded[name]
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.per_call, b.per_call)
        assert torch.equal(a.calls_per_entry, b.calls_per_entry) and a.num_calls == b.num_calls
    with pytest.raises(KeyError, match="no statistics for layer 'x'"):
        loaded["x"]
    with pytest.raises(ValueError, match="inputs is empty"):
        calibrate(run, [], modules=net, disable_progress=True)
    # per_call=False keeps only the running max
    s2 = calibrate(run, inputs, modules=net, per_call=False, disable_progress=True)
    assert s2["fc2"].per_call is None and s2.per_call == {}


# ---- static activation ranges (MixDQ) -------------------------------------------------------------------------------
def test_static_act_qparams_maps_range_ends():
    from effalg.core.calibration import static_act_qparams

    s, z = static_act_qparams(-1.0, 3.0)
    assert abs(s - 4.0 / 255) < 1e-12 and -128 <= z <= 127
    assert round(-1.0 / s) + z == -128 and round(3.0 / s) + z == 127
    s, z = static_act_qparams(0.5, 2.0)  # widened to include 0
    assert round(0.0 / s) + z == -128
    assert static_act_qparams(0.0, 0.0) == (1.0, 0)
    with pytest.raises(ValueError, match="not finite"):
        static_act_qparams(float("-inf"), 1.0)


def test_range_collector_ema_splits_and_skipped_tokens():
    from effalg.core.calibration import RangeCollector

    lin, conv = nn.Linear(4, 3), nn.Conv2d(6, 2, 1)
    splits = {}
    col = RangeCollector({"lin": lin, "conv": conv}, splits=splits, skip_tokens={"lin": 1}, momentum=0.5)
    with col:
        x = torch.zeros(1, 3, 4)
        x[0, 0] = 1000.0  # BOS token: left out
        x[0, 1:] = torch.tensor([-1.0, 2.0, 0.0, 0.0])
        lin(x)
        splits["conv"] = [2, 4]  # filled live (e.g. by an up block's pre-hook)
        c = torch.zeros(1, 6, 2, 2)
        c[:, :2] = 5.0
        c[:, 2:] = -3.0
        conv(c)
        lin(x * 3)
    assert not lin._forward_pre_hooks and not conv._forward_pre_hooks
    r = col.ranges()
    torch.testing.assert_close(r["lin"], torch.tensor([[0.5 * -1 + 0.5 * -3, 0.5 * 2 + 0.5 * 6]]))
    torch.testing.assert_close(r["conv"], torch.tensor([[5.0, 5.0], [-3.0, -3.0]]))
    with pytest.raises(ValueError, match="momentum"):
        RangeCollector({"lin": lin}, momentum=1.0)
    batched = RangeCollector({"lin": lin}, momentum=0.5, calls_per_batch=2)  # min-max per batch, EMA across batches
    with batched:
        for v in (1.0, 4.0, 2.0):
            lin(torch.full((1, 4), v))
    torch.testing.assert_close(batched.ranges()["lin"], torch.tensor([[0.5 * 1 + 0.5 * 2, 0.5 * 4 + 0.5 * 2]]))
    bad = RangeCollector({"conv": conv}, splits={"conv": [1, 1]})
    with bad, pytest.raises(ValueError, match=r"channel ranges \[1, 1\] do not cover 6"):
        conv(c)
