"""Low-bit compute for effalg: ``torch.ops.effalg.*`` custom ops.

Each op has a plain-PyTorch reference (:mod:`effalg.kernels.reference`, the default for any device), a fast CPU
implementation (:mod:`effalg.kernels.cpu`), Triton kernels for CUDA (:mod:`effalg.kernels.triton`, registered when
CUDA is available) and a fake kernel for ``torch.compile``. Call them through the validating wrappers below.
"""

import torch as _torch

from . import _attention_ops, _ops  # noqa: F401  (declare the op schemas)
from . import attention_cpu as _attention_cpu
from . import cpu as _cpu
from . import weight_only_cpu as _weight_only_cpu
from .attention import band_attention, band_decode_attention
from .ops import (
    MAX_HADAMARD_BLOCK,
    MAX_INT8_K,
    MAX_INT8_ZP_K,
    WEIGHT_ONLY_BITS,
    WXA8_BITS,
    hadamard_block_size,
    int8_scaled_mm,
    prepack_int8_weight,
    quantize_per_token,
    smooth_hadamard,
    unpack_int8_weight,
    w4a8_linear,
    w8a8_linear,
    weight_only_linear,
    weight_rowsum,
    wxa8_linear,
)
from .packing import (
    SUPPORTED_BITS,
    pack_bits,
    pack_int2_symmetric,
    pack_int4_symmetric,
    packed_size,
    unpack_bits,
    unpack_int2_symmetric,
    unpack_int4_symmetric,
)
from .weight_only_cpu import (
    prepack_weight_only,
    unpack_weight_only,
    weight_only_cpu_layout,
    weight_only_linear_packed,
)

_cpu.register()
_weight_only_cpu.register()  # after _cpu: replaces its weight_only_linear CPU kernel
_attention_cpu.register()
if _torch.cuda.is_available():  # Triton is imported only where it can run
    from .triton import register as _register_triton

    _register_triton()

from .allocator import bounded_allocations, configure_allocator, release_memory  # noqa: E402

__all__ = [
    "MAX_HADAMARD_BLOCK",
    "MAX_INT8_K",
    "MAX_INT8_ZP_K",
    "SUPPORTED_BITS",
    "WEIGHT_ONLY_BITS",
    "WXA8_BITS",
    "band_attention",
    "band_decode_attention",
    "bounded_allocations",
    "configure_allocator",
    "hadamard_block_size",
    "int8_scaled_mm",
    "pack_bits",
    "pack_int2_symmetric",
    "pack_int4_symmetric",
    "packed_size",
    "prepack_int8_weight",
    "prepack_weight_only",
    "quantize_per_token",
    "release_memory",
    "smooth_hadamard",
    "unpack_bits",
    "unpack_int2_symmetric",
    "unpack_int4_symmetric",
    "unpack_int8_weight",
    "unpack_weight_only",
    "w4a8_linear",
    "w8a8_linear",
    "weight_only_cpu_layout",
    "weight_only_linear",
    "weight_only_linear_packed",
    "weight_rowsum",
    "wxa8_linear",
]
