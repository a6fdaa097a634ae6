import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from torch import nn

from effalg.core.plans import BitPlan, Plan, PlanError, load_plan, register_plan_kind


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))


def test_bitplan_roundtrip(tmp_path):
    plan = BitPlan.from_bits({"0": 4, "2.0": 8}, {"0": 8}, model={"name_or_path": "tiny"}, metadata={"avg": 6.0})
    assert plan.entries == {"0": {"weight_bits": 4, "act_bits": 8}, "2.0": {"weight_bits": 8, "act_bits": None}}
    path = tmp_path / "plan.json"
    plan.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "effalg.plan" and raw["kind"] == "bit_plan" and raw["version"] == 1
    assert raw["model"] == {"name_or_path": "tiny"}
    loaded = load_plan(path)
    assert isinstance(loaded, BitPlan)
    assert loaded.to_dict() == plan.to_dict()
    assert BitPlan.load(path).weight_bits() == {"0": 4, "2.0": 8}
    assert loaded.act_bits() == {"0": 8, "2.0": None}
    loaded.validate_against(_model())


def test_validate_against_lists_missing_layers():
    plan = BitPlan(entries={"0": {"weight_bits": 4}, "nope.a": {"weight_bits": 8}, "nope.b": {"act_bits": 8}})
    with pytest.raises(PlanError, match=r"2 layer\(s\).*'nope\.a', 'nope\.b'"):
        plan.validate_against(_model())


@pytest.mark.parametrize(
    "entries,match",
    [
        ({"l1": {"weight_bits": 5}}, r"layer 'l1' has invalid weight_bits=5"),
        ({"l1": {"act_bits": True}}, r"layer 'l1' has invalid act_bits=True"),
        ({"l2": {"wbits": 4}}, r"layer 'l2' has unknown key\(s\) \['wbits'\]"),
        ({"l3": 4}, r"entry for layer 'l3' must be a dict"),
    ],
)
def test_bitplan_entry_validation_names_layer(entries, match):
    with pytest.raises(PlanError, match=match):
        BitPlan(entries=entries)


def test_from_dict_validation():
    good = BitPlan(entries={"a": {"weight_bits": 4}}).to_dict()
    for key, match in [("format", "missing required key 'format'"), ("entries", "missing required key 'entries'")]:
        bad = dict(good)
        del bad[key]
        with pytest.raises(PlanError, match=match):
            Plan.from_dict(bad)
    with pytest.raises(PlanError, match=r"unknown top-level key\(s\) \['extra'\]"):
        Plan.from_dict({**good, "extra": 1})
    with pytest.raises(PlanError, match="format"):
        Plan.from_dict({**good, "format": "other"})
    with pytest.raises(PlanError, match="newer than supported"):
        Plan.from_dict({**good, "version": 99})
    with pytest.raises(PlanError, match="unknown plan kind 'foo'"):
        Plan.from_dict({**good, "kind": "foo"})


def test_corrupt_file_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "effalg.plan", ')
    with pytest.raises(PlanError, match="broken.json.*not valid JSON"):
        load_plan(path)
    path2 = tmp_path / "badlayer.json"
    path2.write_text(json.dumps({**BitPlan().to_dict(), "entries": {"x.y": {"weight_bits": 7}}}))
    with pytest.raises(PlanError, match=r"layer 'x\.y'.*badlayer\.json"):
        load_plan(path2)


def test_custom_kind_registry(tmp_path):
    @register_plan_kind
    @dataclass
    class _AttnPlan(Plan):
        kind: ClassVar[str] = "test_attention_plan"
        version: ClassVar[int] = 2

        def validate_entry(self, name, entry):
            if entry not in ("full", "window"):
                raise PlanError(f"_AttnPlan: layer {name!r} has invalid strategy {entry!r}")
            return entry

    p = _AttnPlan(entries={"blocks.0.attn": "window"})
    path = tmp_path / "attn.json"
    p.save(path)
    loaded = load_plan(path)
    assert type(loaded) is _AttnPlan and loaded.entries == {"blocks.0.attn": "window"}
    with pytest.raises(PlanError, match="expected kind 'bit_plan'"):
        BitPlan.load(path)
    with pytest.raises(ValueError, match="already registered"):

        @register_plan_kind
        @dataclass
        class _Dup(Plan):
            kind: ClassVar[str] = "test_attention_plan"
