"""Framework-agnostic conformance suite for compressed models (pytest base class).

Subclass :class:`QuantizationConformanceMixin` in a test module with a ``Test`` name and implement the hooks::

    class TestMyLinearW8A8(QuantizationConformanceMixin):
        quantized_module_types = (W8A8Linear,)
        min_psnr = 35.0
        expected_memory_ratio = 1.5

        def make_reference(self): return build_float_model()
        def make_compressed(self): return load_model_with_my_quantizer()
        def run(self, model): return model(fixed_inputs)          # deterministic, returns a tensor
        def save(self, model, directory): model.save_pretrained(directory)
        def load(self, directory): return load_compressed(directory)

Hooks (methods; override as needed):

=========================  ==============================================================================
``make_reference()``       the float model (built once per class, cached)
``make_compressed()``      the compressed model (built once per class, cached)
``run(model)``             deterministic forward on fixed inputs -> tensor (or anything ``as_tensor`` maps)
``as_tensor(output)``      output -> float tensor (default: identity for tensors, first item of tuples)
``save(model, dir)``       persist ``model`` into the (fresh, empty) directory ``dir``
``load(dir)``              load what :meth:`save` wrote
``compile(model)``         compiled model (default ``torch.compile(model, fullgraph=compile_fullgraph,
                           backend=compile_backend)``); return None to skip
``memory_bytes(model)``    bytes of parameters + buffers (each tensor once)
``bad_input_cases()``      iterable of ``(callable, exception type, regex)``; each callable must raise
=========================  ==============================================================================

Class attributes (tolerances): ``atol`` (max |compressed - reference|, None = unchecked), ``min_psnr`` (dB, peak =
reference max - min), ``min_sqnr`` (dB), ``expected_memory_ratio`` (reference bytes / compressed bytes must be at
least this), ``quantized_module_types`` (at least one such module must be present), ``compile_atol``,
``compile_fullgraph``, ``compile_backend``.

Tests provided: ``test_has_quantized_modules``, ``test_output_close_to_reference``, ``test_save_load_roundtrip``
(bit-identical outputs), ``test_memory_ratio``, ``test_compile_matches_eager``, ``test_bad_inputs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from ..metrics import psnr, sqnr
from ..modules.base import memory_footprint

__all__ = ["QuantizationConformanceMixin", "module_memory_bytes"]


#: Bytes of a model's parameters and buffers, each tensor once (the footprint every effalg module reports).
module_memory_bytes = memory_footprint


class QuantizationConformanceMixin:
    """Pytest base class checking a compressed model against its float reference. See the module docstring."""

    atol: ClassVar[float | None] = None
    min_psnr: ClassVar[float | None] = None
    min_sqnr: ClassVar[float | None] = None
    expected_memory_ratio: ClassVar[float | None] = None
    quantized_module_types: ClassVar[tuple[type, ...]] = ()
    compile_atol: ClassVar[float] = 1e-3
    compile_fullgraph: ClassVar[bool] = True
    compile_backend: ClassVar[str] = "inductor"

    _cache: ClassVar[dict] = {}

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def make_reference(self) -> nn.Module:
        raise NotImplementedError

    def make_compressed(self) -> nn.Module:
        raise NotImplementedError

    def run(self, model: nn.Module) -> Any:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: str) -> None:
        raise NotImplementedError

    def load(self, directory: str) -> nn.Module:
        raise NotImplementedError

    def as_tensor(self, output: Any) -> torch.Tensor:
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}.run must return a tensor (or override as_tensor), got {type(output)}"
            )
        return output

    def compile(self, model: nn.Module) -> nn.Module | None:
        return torch.compile(model, fullgraph=self.compile_fullgraph, backend=self.compile_backend)

    def memory_bytes(self, model: nn.Module) -> int:
        return module_memory_bytes(model)

    def bad_input_cases(self) -> Iterable[tuple[Callable[[], Any], type[BaseException], str]]:
        return ()

    # ---- cached artifacts -------------------------------------------------------------------------------------------
    def _cached(self, key: str, fn: Callable[[], Any]) -> Any:
        store = QuantizationConformanceMixin._cache.setdefault(type(self), {})
        if key not in store:
            store[key] = fn()
        return store[key]

    @property
    def reference(self) -> nn.Module:
        return self._cached("reference", self.make_reference)

    @property
    def compressed(self) -> nn.Module:
        return self._cached("compressed", self.make_compressed)

    def _out(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return self.as_tensor(self.run(model)).detach()

    @property
    def reference_output(self) -> torch.Tensor:
        return self._cached("reference_output", lambda: self._out(self.reference))

    @property
    def compressed_output(self) -> torch.Tensor:
        return self._cached("compressed_output", lambda: self._out(self.compressed))

    @classmethod
    def teardown_class(cls) -> None:
        QuantizationConformanceMixin._cache.pop(cls, None)

    # ---- tests ------------------------------------------------------------------------------------------------------
    def test_has_quantized_modules(self):
        if not self.quantized_module_types:
            pytest.skip("quantized_module_types not set")
        n = sum(isinstance(m, self.quantized_module_types) for m in self.compressed.modules())
        assert n > 0, f"no {[t.__name__ for t in self.quantized_module_types]} in the compressed model"

    def test_output_close_to_reference(self):
        if self.atol is None and self.min_psnr is None and self.min_sqnr is None:
            pytest.skip("no tolerance set (atol / min_psnr / min_sqnr)")
        ref, out = self.reference_output.float(), self.compressed_output.float()
        assert out.shape == ref.shape, f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
        assert torch.isfinite(out).all(), "compressed output has non-finite values"
        if self.atol is not None:
            diff = (out - ref).abs().max().item()
            assert diff <= self.atol, f"max |compressed - reference| = {diff:.3g} > atol {self.atol}"
        if self.min_psnr is not None:
            peak = float(ref.max() - ref.min()) or 1.0
            p = psnr(ref, out, data_range=peak)
            assert p >= self.min_psnr, f"PSNR {p:.2f} dB < {self.min_psnr} dB"
        if self.min_sqnr is not None:
            s = sqnr(ref, out)
            assert s >= self.min_sqnr, f"SQNR {s:.2f} dB < {self.min_sqnr} dB"

    def test_save_load_roundtrip(self, tmp_path):
        directory = str(tmp_path / "saved")
        self.save(self.compressed, directory)
        loaded = self.load(directory)
        if self.quantized_module_types:
            assert any(isinstance(m, self.quantized_module_types) for m in loaded.modules()), (
                "reloaded model lost its quantized modules"
            )
        out = self._out(loaded)
        ref = self.compressed_output
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.equal(out, ref), (
            f"reloaded output differs (max diff {(out.float() - ref.float()).abs().max().item():.3g})"
        )

    def test_memory_ratio(self):
        if self.expected_memory_ratio is None:
            pytest.skip("expected_memory_ratio not set")
        ratio = self.memory_bytes(self.reference) / max(1, self.memory_bytes(self.compressed))
        assert ratio >= self.expected_memory_ratio, f"memory ratio {ratio:.3f} < expected {self.expected_memory_ratio}"

    def test_compile_matches_eager(self):
        compiled = self.compile(self.compressed)
        if compiled is None:
            pytest.skip("compile() returned None")
        torch._dynamo.reset()
        try:
            out = self._out(compiled)
        finally:
            torch._dynamo.reset()
        ref = self.compressed_output
        diff = (out.float() - ref.float()).abs().max().item()
        assert math.isfinite(diff) and diff <= self.compile_atol, (
            f"compiled vs eager max diff {diff:.3g} > {self.compile_atol}"
        )

    def test_bad_inputs(self):
        cases = list(self.bad_input_cases())
        if not cases:
            pytest.skip("no bad_input_cases")
        for fn, exc, match in cases:
            with pytest.raises(exc, match=match):
                fn()
