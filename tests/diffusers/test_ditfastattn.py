"""DiTFastAttn at run time (effalg.diffusers.ditfastattn): exactness, the paper's formulas, model families, caches,
save / load, composition with quantization, errors."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel, UNet2DConditionModel

import effalg.diffusers as ED
from effalg.core.ditfastattn_plan import DiTFastAttnPlan
from effalg.core.modules import QuantModuleBase
from effalg.core.plans import PlanError
from effalg.diffusers import DiTFastAttnConfig, DiTFastAttnMismatch, ViDiTQConfig
from effalg.diffusers import testing as T
from effalg.diffusers.ditfastattn import DiTFastAttnProcessor, DiTFastAttnRuntime, attention_layers

STEPS = 4


def _load(path, **kw):
    pipe = DiffusionPipeline.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(pipe, **over):
    kw = T.pipeline_kwargs(pipe)
    kw.update(num_inference_steps=STEPS)
    if type(pipe).__name__ != "FluxPipeline":
        kw["guidance_scale"] = 4.5  # CFG on: the [uncond, cond] batch
    kw.update(over)
    return kw


@torch.no_grad()
def _run(pipe, **over):
    out = pipe(**_kwargs(pipe, **over))
    return out.frames if hasattr(out, "frames") else out.images


def _search(pipe, threshold=1e9, **over):
    """A plan from the search (its metadata fits the pipeline); a huge threshold takes the first candidate."""
    kw = _kwargs(pipe, **over)
    prompts = kw.pop("class_labels", None) or [kw.pop("prompt")]
    for k in ("generator", "output_type"):
        kw.pop(k)
    steps = kw.pop("num_inference_steps")
    return ED.search_ditfastattn(pipe, prompts, threshold=threshold, num_inference_steps=steps, **kw)


def _with(plan, methods):
    """``plan`` with every layer running ``methods`` (one per step, or one method after a full step 0)."""
    md = dict(plan.metadata)
    return DiTFastAttnPlan.uniform(list(plan.entries), methods, **md)


# ---- the paper's formulas against an independent float64 reference ------------------------------------------------


def _ref_attention(attn, x, window=None):
    """float64 multi-head self-attention of ``attn`` (before ``to_out``), optionally masked to ``|i - j| <= window``."""
    p = {k: v.double() for k, v in attn.state_dict().items()}
    h = attn.heads
    q, k, v = (x @ p[f"to_{n}.weight"].T + p[f"to_{n}.bias"] for n in "qkv")
    B, N, C = q.shape
    q, k, v = (t.view(B, N, h, C // h).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / (C // h) ** 0.5
    if window is not None:
        i = torch.arange(N)
        s = s.masked_fill((i[:, None] - i[None, :]).abs() > window, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, N, C)


def _ref_out(attn, o):
    p = {k: v.double() for k, v in attn.state_dict().items()}
    return o @ p["to_out.0.weight"].T + p["to_out.0.bias"]


def test_methods_match_float64_reference_of_the_paper(tiny_pixart_alpha):
    model = PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer")
    layers = attention_layers(model)
    name, attn = next(iter(layers.items()))
    methods = ["full", "wars", "ast", "wars+asc", "full+asc", "wars"]
    w, n, c = 3, 16, attn.to_q.in_features
    plan = DiTFastAttnPlan.uniform(
        list(layers), methods, window=w, num_steps=len(methods), num_tokens=n, text_tokens=0, cfg=True, hidden_size=c
    )
    rt = DiTFastAttnRuntime(plan, model)
    proc = DiTFastAttnProcessor(name, attn.processor, ED.ditfastattn._self_attention, rt)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, n, c, generator=g) for _ in methods]
    full = lambda x: _ref_attention(attn, x)  # noqa: E731
    win = lambda x: _ref_attention(attn, x, w)  # noqa: E731
    dup = lambda t: torch.cat([t, t])  # noqa: E731
    x = [t.double() for t in xs]
    r0 = full(x[0]) - win(x[0])  # WA-RS residual cached at step 0
    y1 = _ref_out(attn, win(x[1]) + r0)
    c3, c4 = x[3][2:], x[4][2:]  # the conditional halves ([uncond, cond])
    r4 = dup(full(c4) - win(c4))  # cached at the full+asc step 4, for both halves
    expected = [
        _ref_out(attn, full(x[0])),
        y1,
        y1,  # AST: step 1's output
        dup(_ref_out(attn, win(c3) + r0[2:])),
        dup(_ref_out(attn, full(c4))),
        _ref_out(attn, win(x[5]) + r4),
    ]
    with torch.no_grad():
        for step, (xi, want) in enumerate(zip(xs, expected)):
            rt.step, rt.finished = step, False
            got = proc(attn, xi)
            torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5, msg=f"step {step} ({methods[step]})")
            if step == 0:  # at the residual step WA-RS is full attention: the layer's own processor, exactly
                assert torch.equal(got, attn.processor(attn, xi))
                torch.testing.assert_close(
                    (proc._window(*_qkv(attn, xi), 0, "first") + rt.residuals[name]).double(),
                    full(x[0]).view(4, n, attn.heads, -1).transpose(1, 2),
                    rtol=0,
                    atol=2e-5,
                )


def _qkv(attn, x):
    B, N, C = x.shape
    return (getattr(attn, f"to_{n}")(x).view(B, N, attn.heads, -1).transpose(1, 2) for n in "qkv")


# ---- model families ----------------------------------------------------------------------------------------------

FAMILIES = ["pixart_alpha", "pixart_sigma", "dit", "sd3", "flux", "latte"]


@pytest.fixture
def family_pipe(request):
    return _load(request.getfixturevalue(f"tiny_{request.param}"))


@pytest.mark.parametrize("family_pipe", FAMILIES, indirect=True)
def test_families_all_full_is_exact_and_methods_run(family_pipe):
    pipe = family_pipe
    ref = _run(pipe)
    plan = _search(pipe)
    assert plan.metadata["cfg"] == (type(pipe).__name__ != "FluxPipeline")
    assert torch.equal(_run(pipe), ref)  # the search leaves the pipeline as it was
    ED.apply_ditfastattn(pipe, _with(plan, ["full"] * STEPS))
    assert torch.equal(_run(pipe), ref)
    methods = ["wars", "ast"] + (["wars+asc", "full+asc"] if plan.metadata["cfg"] else [])
    for m in methods:
        ED.apply_ditfastattn(pipe, _with(plan, m))
        out = _run(pipe)
        rt = ED.ditfastattn_runtime(pipe)
        assert torch.isfinite(out).all() and not torch.equal(out, ref), m
        assert rt.cache_bytes == 0 and (rt.peak_cache_bytes > 0) == (m != "full+asc"), m
    ED.remove_ditfastattn(pipe)
    assert torch.equal(_run(pipe), ref)
    assert not any(isinstance(getattr(m, "processor", None), DiTFastAttnProcessor) for m in pipe.transformer.modules())


def test_mmdit_text_tokens_stay_global(tiny_sd3):
    pipe = _load(tiny_sd3)
    plan = _search(pipe)
    assert plan.metadata["text_tokens"] > 0
    layers = attention_layers(pipe.transformer)
    name, attn = next(iter(layers.items()))
    proc = DiTFastAttnProcessor(
        name, attn.processor, ED.ditfastattn._joint_attention, DiTFastAttnRuntime(plan, pipe.transformer)
    )
    g = torch.Generator().manual_seed(0)
    n, t, h = plan.metadata["num_tokens"], plan.metadata["text_tokens"], 2
    q, k, v = (torch.randn(1, h, n + t, 8, generator=g) for _ in range(3))  # SD3 order: [image, text]
    o = proc._window(q, k, v, t, "last")
    i = torch.arange(n + t)
    img = i < n
    near = ((i[:, None] - i[None, :]).abs() <= plan.window) & img[:, None] & img[None, :]
    mask = near | ~img[:, None] | ~img[None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


# ---- caches ------------------------------------------------------------------------------------------------------


def test_caches_are_released_after_each_call_and_reset_between_calls(tiny_pixart_alpha):
    pipe = _load(tiny_pixart_alpha)
    plan = _with(_search(pipe), ["full", "wars", "ast", "wars"])
    ED.apply_ditfastattn(pipe, plan)
    a = _run(pipe)
    rt = ED.ditfastattn_runtime(pipe)
    peak = rt.peak_cache_bytes
    # two layers x (residual [B, H, N, D] + output [B, N, C]) in fp32, CFG batch of 2
    assert peak == 2 * (2 * 2 * 16 * 16 + 2 * 16 * 32) * 4
    assert rt.cache_bytes == 0 and not rt.outputs and not rt.residuals
    b = _run(pipe)
    assert torch.equal(a, b) and rt.peak_cache_bytes == peak  # nothing carried over from the first call
    _run(pipe, prompt="a dog")
    assert rt.cache_bytes == 0


# ---- save / load -------------------------------------------------------------------------------------------------


def test_saved_plan_loads_active_with_a_plain_from_pretrained(tiny_pixart_alpha, tmp_path):
    pipe = _load(tiny_pixart_alpha)
    plan = _with(_search(pipe), ["full", "wars", "ast", "full+asc"])
    ED.apply_ditfastattn(pipe, plan)
    pipe.save_pretrained(tmp_path / "saved")
    qc = json.load(open(tmp_path / "saved" / "transformer" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "effalg_ditfastattn" and qc["attention_plan"]["kind"] == "ditfastattn"
    assert "- ditfastattn" in (tmp_path / "saved" / "README.md").read_text()
    again = _load(tmp_path / "saved")
    rt = ED.ditfastattn_runtime(again)
    assert rt is not None and rt.plan == plan
    assert not again.transformer.is_quantized  # float weights: dtype casts stay allowed
    # float weights reloaded from safetensors agree to rounding (see test_testing_factories)
    torch.testing.assert_close(_run(again), _run(pipe), rtol=0, atol=1e-5)
    again.transformer.to(torch.bfloat16)
    assert again.transformer.dtype == torch.bfloat16


def test_plan_given_at_load_time(tiny_pixart_alpha):
    pipe = _load(tiny_pixart_alpha)
    plan = _with(_search(pipe), "ast")
    ED.apply_ditfastattn(pipe, plan)
    want = _run(pipe)
    loaded = _load(tiny_pixart_alpha, quantization_config=DiTFastAttnConfig(plan))
    assert ED.ditfastattn_runtime(loaded).plan == plan
    torch.testing.assert_close(_run(loaded), want, rtol=0, atol=1e-5)
    model = PixArtTransformer2DModel.from_pretrained(
        tiny_pixart_alpha, subfolder="transformer", quantization_config=DiTFastAttnConfig(plan.to_dict())
    )
    assert ED.ditfastattn_runtime(model) is not None


def test_vidit_q_and_ditfastattn_on_one_denoiser_reload_bit_identical(tiny_pixart_alpha, tmp_path):
    pipe = _load(tiny_pixart_alpha, quantization_config=ViDiTQConfig(weight_bits=8, act_bits=8, balance_layers=None))
    plan = _with(_search(pipe), ["full", "wars+asc", "ast", "wars"])
    ED.apply_ditfastattn(pipe, plan)
    images = _run(pipe)
    pipe.save_pretrained(tmp_path / "both")
    qc = json.load(open(tmp_path / "both" / "transformer" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "effalg_vidit_q" and qc["attention_plan"]["kind"] == "ditfastattn"
    again = _load(tmp_path / "both")
    assert any(isinstance(m, QuantModuleBase) for m in again.transformer.modules())
    assert ED.ditfastattn_runtime(again).plan == plan
    assert torch.equal(_run(again), images)
    # the plan also rides on a quantization config given at load time
    direct = _load(
        tiny_pixart_alpha,
        quantization_config=ViDiTQConfig(weight_bits=8, act_bits=8, balance_layers=None, attention_plan=plan),
    )
    assert torch.equal(_run(direct), images)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_plan_for_another_model_is_named(tiny_pixart_alpha):
    pipe = _load(tiny_pixart_alpha)
    plan = _search(pipe)
    entries = dict(plan.entries)
    entries["transformer_blocks.7.attn1"] = ["full"] * STEPS
    bad = DiTFastAttnPlan(entries=entries, metadata=plan.metadata)
    with pytest.raises(PlanError, match=r"2 self-attention layer\(s\).*not in the model: \['transformer_blocks\.7"):
        ED.apply_ditfastattn(pipe, bad)


def test_call_mismatches_are_named(tiny_pixart_alpha):
    pipe = _load(tiny_pixart_alpha)
    ED.apply_ditfastattn(pipe, _with(_search(pipe), ["full", "wars", "full+asc", "ast"]))
    with pytest.raises(DiTFastAttnMismatch, match=r"step 1 runs at timestep .*num_inference_steps=4"):
        _run(pipe, num_inference_steps=8)
    with pytest.raises(DiTFastAttnMismatch, match=r"got 64 image tokens but the plan was searched at 16"):
        _run(pipe, height=32, width=32)
    with pytest.raises(DiTFastAttnMismatch, match=r"shares attention across CFG branches at step 2.*not a \[uncond"):
        _run(pipe, guidance_scale=1.0)
    assert torch.isfinite(_run(pipe)).all()  # a failed call leaves nothing behind
    assert ED.ditfastattn_runtime(pipe).cache_bytes == 0


def test_window_larger_than_the_sequence(tiny_pixart_alpha):
    pipe = _load(tiny_pixart_alpha)
    with pytest.raises(ValueError, match=r"window must be an int in \[1, 15\] \(16 image tokens\), got 16"):
        _search(pipe, window=16)
    plan = _search(pipe).to_dict()
    plan["metadata"]["window"] = 40
    with pytest.raises(PlanError, match=r"window ±40 is not smaller than the sequence of 16"):
        ED.apply_ditfastattn(pipe, plan)


def test_unknown_method_in_a_plan_file(tiny_pixart_alpha, tmp_path):
    pipe = _load(tiny_pixart_alpha)
    d = _search(pipe).to_dict()
    d["entries"]["transformer_blocks.1.attn1"][1] = "sparse"
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"transformer_blocks\.1\.attn1', step 1: unknown method 'sparse'.*plan\.json"):
        ED.apply_ditfastattn(pipe, tmp_path / "plan.json")


def test_model_without_self_attention_blocks():
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
        layers_per_block=1, cross_attention_dim=16, norm_num_groups=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"UNet2DConditionModel has no supported self-attention blocks"):
        ED.apply_ditfastattn(unet, {})
    with pytest.raises(ValueError, match="attention_plan is required"):
        DiTFastAttnConfig()
