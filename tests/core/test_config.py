import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from effalg.core.config import EffalgConfig, LinearQuantConfig, quantize_, register_handler
from effalg.core.modules import W4A8Linear, W8A8Linear, WeightOnlyLinear


class _Tiny(nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.proj_in = nn.Linear(16, 32, device=device)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 32, device=device), nn.GELU()) for _ in range(2)])
        self.proj_out = nn.Linear(32, 8, device=device)

    def forward(self, x):
        x = self.proj_in(x)
        for b in self.blocks:
            x = b(x)
        return self.proj_out(x)


@pytest.mark.parametrize(
    "cfg,cls",
    [
        (LinearQuantConfig(8, 8), W8A8Linear),
        (LinearQuantConfig(4, 8, weight_group_size=8), W4A8Linear),
        (LinearQuantConfig(3, None, weight_group_size=16), WeightOnlyLinear),
        (LinearQuantConfig(4, None, weight_symmetric=False), WeightOnlyLinear),
    ],
)
def test_quantize_swaps_all_linears(cfg, cls):
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(2, 16)
    ref = model(x)
    quantize_(model, cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, cls)]
    assert names == ["proj_in", "blocks.0.0", "blocks.1.0", "proj_out"]
    assert not any(type(m) is nn.Linear for m in model.modules())
    y = model(x)
    assert (y - ref).abs().max() < 0.15 * ref.abs().max()


def test_modules_to_not_convert_and_filter():
    model = _Tiny()
    quantize_(model, LinearQuantConfig(modules_to_not_convert=["proj_out"]), modules_to_not_convert=["blocks.1"])
    assert type(model.proj_out) is nn.Linear and type(model.blocks[1][0]) is nn.Linear
    assert isinstance(model.proj_in, W8A8Linear) and isinstance(model.blocks[0][0], W8A8Linear)
    model2 = _Tiny()
    quantize_(model2, LinearQuantConfig(), filter_fn=lambda m, name: name.startswith("blocks"))
    assert type(model2.proj_in) is nn.Linear and isinstance(model2.blocks[1][0], W8A8Linear)


def test_quantize_errors():
    with pytest.raises(ValueError, match=r"not in the model.*\['nope'\]"):
        quantize_(_Tiny(), LinearQuantConfig(), modules_to_not_convert=["nope"])
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize_(nn.Sequential(nn.ReLU()), LinearQuantConfig())
    with pytest.raises(TypeError, match="config must be an EffalgConfig"):
        quantize_(_Tiny(), {"weight_bits": 8})


def test_meta_model_swap_then_load():
    torch.manual_seed(0)
    src = quantize_(_Tiny(), LinearQuantConfig(4, 8, weight_group_size=16))
    sd = src.state_dict()
    meta = quantize_(_Tiny(device="meta"), LinearQuantConfig(4, 8, weight_group_size=16))
    assert isinstance(meta.proj_in, W4A8Linear) and meta.proj_in.qweight.is_meta
    meta.load_state_dict(sd, assign=True)
    x = torch.randn(3, 16)
    assert torch.equal(meta(x), src(x))


def test_config_validation_and_dict_roundtrip():
    cfg = LinearQuantConfig(4, None, weight_group_size=32, modules_to_not_convert=["lm_head"])
    d = cfg.to_dict()
    assert d == {
        "version": 1,
        "weight_bits": 4,
        "act_bits": None,
        "weight_group_size": 32,
        "weight_symmetric": True,
        "modules_to_not_convert": ["lm_head"],
    }
    assert LinearQuantConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bitz'\]"):
        LinearQuantConfig.from_dict({**d, "bitz": 3})
    with pytest.raises(ValueError, match="weight_bits must be one of"):
        LinearQuantConfig(3, 8)
    with pytest.raises(ValueError, match="act_bits must be 8 or None"):
        LinearQuantConfig(8, 4)
    with pytest.raises(ValueError, match="weight_group_size must be 0 for W8A8"):
        LinearQuantConfig(8, 8, weight_group_size=32)
    with pytest.raises(ValueError, match="version 2 is not supported"):
        LinearQuantConfig(version=2)


def test_custom_handler_registry():
    @dataclass
    class _ReluToTanh(EffalgConfig):
        pass

    @register_handler(_ReluToTanh)
    def _h(module, config, name):
        return nn.Tanh() if isinstance(module, nn.GELU) else None

    model = quantize_(_Tiny(), _ReluToTanh())
    assert isinstance(model.blocks[0][1], nn.Tanh)
    with pytest.raises(TypeError, match="no handler registered"):

        @dataclass
        class _Unregistered(EffalgConfig):
            pass

        quantize_(_Tiny(), _Unregistered())


def test_bit_plan_config_mixed_precision():
    from effalg.core.config import BitPlanConfig
    from effalg.core.modules import W8A8Conv2d
    from effalg.core.plans import BitPlan, PlanError

    plan = BitPlan.from_bits(
        {"proj_in": 8, "blocks.0.0": 4, "blocks.1.0": 3, "proj_out": None},
        {"proj_in": 8, "blocks.0.0": 8},
    )
    model = _Tiny()
    x = torch.randn(2, 16)
    ref = model(x)
    quantize_(model, BitPlanConfig(plan=plan, weight_group_size=16))
    assert isinstance(model.proj_in, W8A8Linear)
    assert isinstance(model.blocks[0][0], W4A8Linear) and model.blocks[0][0].group_size == 16
    assert isinstance(model.blocks[1][0], WeightOnlyLinear) and model.blocks[1][0].bits == 3
    assert type(model.proj_out) is nn.Linear
    assert (model(x) - ref).abs().max() < 0.2 * ref.abs().max()
    cfg = BitPlanConfig(plan=plan)
    assert BitPlanConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(PlanError, match=r"not in the model.*'missing\.layer'"):
        quantize_(_Tiny(), BitPlanConfig(plan=BitPlan.from_bits({"missing.layer": 8}, {"missing.layer": 8})))
    with pytest.raises(ValueError, match=r"layer 'proj_in' has \(weight_bits, act_bits\)=\(2, 8\)"):
        BitPlanConfig(plan=BitPlan.from_bits({"proj_in": 2}, {"proj_in": 8}))
    convs = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    quantize_(convs, BitPlanConfig(plan=BitPlan.from_bits({"0": 8}, {"0": 8})))
    assert isinstance(convs[0], W8A8Conv2d) and type(convs[1]) is nn.Conv2d


def test_mha_out_proj_not_swapped():
    mha = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    quantize_(mha, LinearQuantConfig())
    assert isinstance(mha[0], W8A8Linear) and type(mha[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_module_config_map_routes_by_longest_prefix():
    from effalg.core.config import ModuleConfigMap

    model = _Tiny()
    x = torch.randn(2, 16)
    ref = model(x)
    cfg = ModuleConfigMap(
        {
            "": LinearQuantConfig(weight_bits=3, act_bits=None, weight_group_size=8, weight_symmetric=False),
            "blocks": LinearQuantConfig(weight_bits=4, act_bits=8),
            "blocks.1": LinearQuantConfig(weight_bits=8, act_bits=8, modules_to_not_convert=["blocks.1.0"]),
        },
        modules_to_not_convert=["proj_out"],
    )
    quantize_(model, cfg)
    assert isinstance(model.proj_in, WeightOnlyLinear) and model.proj_in.bits == 3 and model.proj_in.group_size == 8
    assert isinstance(model.blocks[0][0], W4A8Linear)
    assert type(model.blocks[1][0]) is nn.Linear and type(model.proj_out) is nn.Linear
    assert (model(x) - ref).abs().max() < 0.3 * ref.abs().max()
    d = cfg.to_dict()
    assert d["configs"]["blocks"]["type"] == "LinearQuantConfig"
    again = ModuleConfigMap.from_dict(json.loads(json.dumps(d)))
    assert again.configs == cfg.configs and again.to_dict() == d
    assert ModuleConfigMap({"blocks": LinearQuantConfig()}).config_for("proj_in") is None


def test_module_config_map_errors():
    from effalg.core.config import ModuleConfigMap

    with pytest.raises(ValueError, match="non-empty"):
        ModuleConfigMap({})
    with pytest.raises(ValueError, match="unknown config type 'Nope'"):
        ModuleConfigMap({"": {"type": "Nope"}})
    with pytest.raises(ValueError, match="needs a 'type'"):
        ModuleConfigMap({"": {"weight_bits": 8}})
    with pytest.raises(TypeError, match="not a map"):
        ModuleConfigMap({"": ModuleConfigMap({"": LinearQuantConfig()})})
    with pytest.raises(ValueError, match=r"ModuleConfigMap.configs.*'missing'"):
        quantize_(_Tiny(), ModuleConfigMap({"missing": LinearQuantConfig()}))
