"""MoA as attn_implementation="moa": exactness against sdpa and an independent band+sink reference, the compact
cache, generate(), persistence and bad input."""

import copy
import json
import math

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import effalg.transformers as et
from effalg.core import ElasticWindowPlan, PlanError
from effalg.transformers import MoACache, apply_moa, dense_attention, moa_config
from effalg.transformers.testing import tiny_llama, tiny_qwen2

# ---- an independent reference: dense attention with the explicit band+sink mask (the design's semantics) ----------
REF: dict = {}


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense float64 attention over the full (DynamicCache) keys; windows at REF["n"], pads from REF["pad"]."""
    B, Hq, q_len, D = query.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    rep = Hq // Hkv
    n = REF.get("n") or kv_len
    rules = REF["plan"].entries[str(module.layer_idx)]
    w = torch.tensor([min(max(math.ceil(r["alpha"] + r["beta"] * n), 1), n) for r in rules])
    s = torch.tensor([r["sink"] for r in rules])
    # a head with sink + window > n keeps n slots: sink' = min(sink, n - 1), window' = min(window, n - sink') (the same
    # mask for queries < n; decoding past n it slides a window of n - sink')
    s = s.clamp(max=n - 1)
    w = torch.minimum(w, n - s)
    w, s = w.repeat_interleave(rep).view(1, Hq, 1, 1), s.repeat_interleave(rep).view(1, Hq, 1, 1)
    pad = REF["pad"].view(B, 1, 1, 1)
    i = torch.arange(kv_len - q_len, kv_len).view(1, 1, q_len, 1)
    j = torch.arange(kv_len).view(1, 1, 1, kv_len)
    mask = (j >= pad) & (j <= i) & ((i - j < w) | (j - pad < s))
    k = key.double().repeat_interleave(rep, 1)
    v = value.double().repeat_interleave(rep, 1)
    scores = (query.double() @ k.transpose(-1, -2)) * (scaling or D**-0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0) * (i >= pad)  # padding query rows -> zeros
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("effalg_test_moa_ref", _ref_attention)
AttentionMaskInterface.register("effalg_test_moa_ref", sdpa_mask)


def _reference_model(model, plan, pad, n):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("effalg_test_moa_ref")
    REF.update(plan=plan, pad=pad, n=n)
    return ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        "llama": tiny_llama(tmp_path_factory.mktemp("moa_llama"))[1].float(),
        "qwen2": tiny_qwen2(tmp_path_factory.mktemp("moa_qwen2"))[1].float(),
    }


def _inputs(B=2, L=10, pads=(3, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
        ids[b, :p] = 0
    return ids, am


def _plan(num_kv_heads):
    # small windows (the ring buffers wrap during decode), sinks larger than a padded row's prompt, a zero sink
    rules = [
        [
            {"alpha": 2, "beta": 0.2, "sink": 1},
            {"alpha": 1, "beta": 0.0, "sink": 8},
            {"alpha": 3, "beta": 0.1},
            {"alpha": 0, "beta": 0.5, "sink": 2},
        ],
        [
            {"alpha": 4, "beta": 0.0, "sink": 0},
            {"alpha": 0, "beta": 0.3, "sink": 3},
            {"alpha": 1, "beta": 0.0},
            {"alpha": 6, "beta": 0.0, "sink": 1},
        ],
    ]
    return ElasticWindowPlan.from_rules([layer[:num_kv_heads] for layer in rules])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_windows_equal_sdpa(models, arch):
    model = copy.deepcopy(models[arch])
    ids, am = _inputs()
    ref = model(ids, attention_mask=am).logits
    n_kv = model.config.num_key_value_heads
    apply_moa(model, ElasticWindowPlan.uniform(2, n_kv, alpha=0, beta=1.0, sink=0))
    assert model.config._attn_implementation == "moa"
    out = model(ids, attention_mask=am).logits
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    ids1 = ids[1:]  # no padding: transformers passes no mask at all
    torch.testing.assert_close(model(ids1).logits, models[arch](ids1).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_and_every_decode_step_equal_reference(models, arch):
    model = copy.deepcopy(models[arch])
    ids, am = _inputs()
    plan = _plan(model.config.num_key_value_heads)
    apply_moa(model, plan)
    L = ids.shape[1]
    ref = _reference_model(models[arch], plan, pad=(am == 0).sum(1), n=L)
    real = am.bool()
    torch.testing.assert_close(
        model(ids, attention_mask=am).logits[real], ref(ids, attention_mask=am).logits[real], atol=1e-5, rtol=1e-5
    )
    new = 16
    kw = dict(
        attention_mask=am,
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    got = model.generate(ids, **kw)
    want = ref.generate(ids, **kw)
    cache = got.past_key_values
    assert isinstance(cache, MoACache) and isinstance(want.past_key_values, DynamicCache)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == new
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, s=step: f"decode step {s}: {m}")
    # the cache: full position count, compact bytes exactly as the plan predicts
    assert cache.get_seq_length() == L + new - 1
    D = model.config.hidden_size // model.config.num_attention_heads
    assert cache.kv_cache_bytes() == plan.kv_cache_bytes(L, batch_size=2, head_dim=D, dtype=torch.float32)
    dense = 2 * 2 * plan.num_layers * plan.num_kv_heads * L * D * 4
    assert cache.kv_cache_bytes() / dense == pytest.approx(plan.density(L))
    assert plan.density(L) < 0.75


@pytest.mark.parametrize("which", ["mixed", "overlapping", "full_with_sinks"])
def test_kv_bytes_are_density_times_dense(models, which):
    """The MoACache's real bytes == plan.density(N) x a dense cache's bytes (density = kept KV fraction), also for
    heads whose sink + window exceeds N (cached with N slots); generation past N still matches the reference."""
    model = copy.deepcopy(models["qwen2"])
    plans = {
        "mixed": _plan(2),
        "overlapping": ElasticWindowPlan.from_rules([
            [{"alpha": 0, "beta": 0.9, "sink": 3}, {"alpha": 1, "beta": 0.0, "sink": 20}],
            [{"alpha": 2, "beta": 0.0, "sink": 2}, {"alpha": 6, "beta": 0.0, "sink": 5}],
        ]),
        "full_with_sinks": ElasticWindowPlan.uniform(2, 2, alpha=0, beta=1.0, sink=4),
    }
    plan = plans[which]
    apply_moa(model, plan)
    ids, am = _inputs()
    B, L = ids.shape
    ref = _reference_model(models["qwen2"], plan, pad=(am == 0).sum(1), n=L)
    kw = dict(attention_mask=am, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0)
    got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    D = model.config.hidden_size // model.config.num_attention_heads
    dense = 2 * B * plan.num_layers * plan.num_kv_heads * L * D * 4  # K and V, float32
    real = got.past_key_values.kv_cache_bytes()
    assert real == round(plan.density(L) * dense) == plan.kv_cache_bytes(L, batch_size=B, head_dim=D)
    assert plan.density(L) <= 1.0
    if which == "full_with_sinks":
        assert real == dense


def test_user_cache_with_max_length_and_decode_loop(models):
    model = copy.deepcopy(models["qwen2"])
    plan = _plan(2)
    apply_moa(model, plan)
    ids, am = _inputs(pads=(0, 4), seed=1)
    n = 24
    ref = _reference_model(models["qwen2"], plan, pad=(am == 0).sum(1), n=n)
    cache, ref_cache = MoACache(plan, max_length=n), DynamicCache(config=model.config)
    a = model(ids, attention_mask=am, past_key_values=cache)
    b = ref(ids, attention_mask=am, past_key_values=ref_cache)
    real = am.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-5, rtol=1e-5)
    for step in range(12):
        tok = a.logits[:, -1:].argmax(-1)
        am = torch.cat([am, torch.ones_like(tok)], 1)
        a = model(tok, attention_mask=am, past_key_values=cache)
        b = ref(tok, attention_mask=am, past_key_values=ref_cache)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
    assert cache.get_seq_length() == ids.shape[1] + 12
    with pytest.raises(NotImplementedError, match="chunked prefill or a multi-turn continuation"):
        model(ids[:, :3], past_key_values=cache)
    # generate() with a user-given MoACache == the automatic one
    ids, am = _inputs(pads=(0, 4), seed=1)
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    user = MoACache(plan)
    assert torch.equal(model.generate(ids, past_key_values=user, **kw), model.generate(ids, **kw))
    assert user.get_seq_length() == ids.shape[1] + 5


def test_save_and_plain_reload(models, tmp_path):
    model = copy.deepcopy(models["llama"])
    plan = _plan(4)
    apply_moa(model, plan)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["attn_implementation"] == "moa"
    assert ElasticWindowPlan.from_dict(cfg["moa_plan"]).entries == plan.entries
    card = (tmp_path / "README.md").read_text()
    assert "- effalg" in card and "- moa" in card and "density" in card
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == "moa"
    ids, am = _inputs()
    real = am.bool()
    torch.testing.assert_close(loaded(ids, attention_mask=am).logits[real], model(ids, attention_mask=am).logits[real])
    g1 = loaded.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    g2 = model.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


def test_plan_at_load_time_and_dense_attention(models, tmp_path):
    path = tmp_path / "base"
    models["qwen2"].save_pretrained(path)
    plan = _plan(2)
    plan.save(tmp_path / "plan.json")
    model = AutoModelForCausalLM.from_pretrained(path, config=moa_config(path, tmp_path / "plan.json"))
    assert model.config._attn_implementation == "moa"
    ids, am = _inputs()
    real = am.bool()
    ref = _reference_model(models["qwen2"], plan, pad=(am == 0).sum(1), n=ids.shape[1])
    torch.testing.assert_close(
        model(ids, attention_mask=am).logits[real], ref(ids, attention_mask=am).logits[real], atol=1e-5, rtol=1e-5
    )
    with dense_attention(model):
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(
            model(ids, attention_mask=am).logits[real], models["qwen2"](ids, attention_mask=am).logits[real]
        )
    assert model.config._attn_implementation == "moa"


def test_bad_inputs(models, tmp_path):
    model = copy.deepcopy(models["qwen2"])
    with pytest.raises(PlanError, match="plan has 3 layers, model has 2"):
        apply_moa(model, ElasticWindowPlan.uniform(3, 2, 1, 0.1))
    with pytest.raises(PlanError, match="layer 0: plan has 4 KV heads, model has 2"):
        apply_moa(model, ElasticWindowPlan.uniform(2, 4, 1, 0.1))
    bad = ElasticWindowPlan.uniform(2, 2, 1, 0.1).to_dict()
    bad["entries"]["1"][0]["alpha"] = float("nan")
    with pytest.raises(PlanError, match="layer 1, KV head 0: alpha must be finite and >= 0, got nan"):
        apply_moa(model, bad)
    bad["entries"]["1"][0]["alpha"] = 1.0
    bad["entries"]["0"][1]["beta"] = -0.25
    with pytest.raises(PlanError, match="layer 0, KV head 1: beta must be finite and >= 0, got -0.25"):
        apply_moa(model, bad)
    with pytest.raises(ValueError, match="does not exist"):
        apply_moa(model, str(tmp_path / "missing.json"))
    assert model.config._attn_implementation == "sdpa"  # nothing applied

    # "moa" requested without a plan
    path = tmp_path / "noplan"
    models["llama"].save_pretrained(path)
    noplan = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moa")
    with pytest.raises(ValueError, match=r"needs a plan.*apply_moa"):
        noplan(torch.ones(1, 4, dtype=torch.long))

    # unsupported models, named
    from transformers import MambaConfig, MambaForCausalLM, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        apply_moa(t5, ElasticWindowPlan.uniform(2, 2, 1, 0.1))
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2))
    with pytest.raises(ValueError, match="MambaForCausalLM does not route its attention"):
        apply_moa(mamba, ElasticWindowPlan.uniform(2, 2, 1, 0.1))
    with pytest.raises(ValueError, match="expected a transformers PreTrainedModel, got Linear"):
        apply_moa(torch.nn.Linear(2, 2), ElasticWindowPlan.uniform(2, 2, 1, 0.1))

    # runtime limits: right padding, decoding from a non-MoA cache
    apply_moa(model, _plan(2))
    ids, am = _inputs(pads=(0, 0))
    am[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        model(ids, attention_mask=am)
    dyn = DynamicCache(config=model.config)
    out = model(ids, past_key_values=dyn)
    with pytest.raises(NotImplementedError, match="MoA decodes only from a MoACache"):
        model(out.logits[:, -1:].argmax(-1), past_key_values=dyn)
    assert et.MoACache(model).plan.num_layers == 2
