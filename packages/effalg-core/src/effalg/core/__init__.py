"""Method-independent pieces of effalg: quantization specs, quantized modules, calibration, bit allocation,
plan artifacts, metrics and the config/handler registry.

Submodules are imported lazily on first attribute access (``import effalg.core`` stays cheap; scipy is only
imported by :func:`allocate_bits`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # quant
    "Granularity": "quant.spec",
    "QuantSpec": "quant.spec",
    "compute_qparams": "quant.spec",
    "quantize": "quant.spec",
    "dequantize": "quant.spec",
    "fake_quantize": "quant.spec",
    "compute_smooth_scale": "quant.smooth",
    "HadamardRotation": "quant.rotation",
    "random_signs": "quant.rotation",
    # modules
    "QuantModuleBase": "modules",
    "QuantLinear": "modules",
    "W8A8Linear": "modules",
    "W4A8Linear": "modules",
    "WeightOnlyLinear": "modules",
    "QuantConv2d": "modules",
    "W8A8Conv2d": "modules",
    "memory_footprint": "modules",
    "prepack_model_": "modules",
    "unpack_model_": "modules",
    # config
    "EffalgConfig": "config",
    "LinearQuantConfig": "config",
    "BitPlanConfig": "config",
    "ModuleConfigMap": "config",
    "register_handler": "config",
    "get_handler": "config",
    "quantize_": "config",
    # calibration
    "ActivationStatsCollector": "calibration",
    "CalibrationStats": "calibration",
    "LayerStats": "calibration",
    "calibrate": "calibration",
    # allocation
    "Allocation": "allocation",
    "allocate_bits": "allocation",
    "allocate_bits_by_group": "allocation",
    "normalize_costs_by_group": "allocation",
    # plans
    "Plan": "plans",
    "BitPlan": "plans",
    "PlanError": "plans",
    "register_plan_kind": "plans",
    "load_plan": "plans",
    "ElasticWindowPlan": "attention_plan",
    "DiTFastAttnPlan": "ditfastattn_plan",
    # MoA search math
    "ElasticRule": "attention_search",
    "attention_influence": "attention_search",
    "candidate_rules": "attention_search",
    "rule_cost": "attention_search",
    "select_rules": "attention_search",
    # metrics
    "sqnr": "metrics",
    "relative_l2": "metrics",
    "cosine_similarity": "metrics",
    "mse": "metrics",
    "kl_divergence": "metrics",
    "sharded_map": "distributed",
    "SolverSchedule": "solver_schedule",
    "SolverStep": "solver_schedule",
    "ModelSchedule": "model_schedule",
    "psnr": "metrics",
    "ssim": "metrics",
    # io
    "load_state_dict_checked": "io",
    "MissingTensorsError": "io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
