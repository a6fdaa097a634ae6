"""W3 / W4 weight-only decode (and prefill) on the CPU at Llama-7B projection shapes, against a bf16 GEMV.

Shapes N x K: 4096x4096 (q/k/v/o), 11008x4096 (gate/up), 4096x11008 (down); group size 128, asymmetric groups, bf16
activations, no bias. Variants, all timed round-robin in one run (so that a busy machine slows all of them alike):

* ``bf16``: ``nn.Linear`` with a bf16 weight (``F.linear``, oneDNN);
* ``effalg W4`` / ``effalg W3``: ``WeightOnlyLinear.from_float(..., bits=4|3, group_size=128, symmetric=False)`` as
  it comes (prepacked into whatever runtime layout this machine gets: none where the native AVX-512 VBMI/BF16 kernels
  run on the canonical layout);
* ``effalg W4 blocked`` / ``effalg W3 blocked``: the opt-in ``"blocked"`` runtime layout (``prepack_(layout=...)``);
* ``effalg W4 int4pack``: torch's ``aten::_weight_int4pack_mm_for_cpu`` layout (what W4 modules get where the native
  kernels cannot be built);
* ``torchao int4 wo``: torchao's int4 weight-only CPU config (a benchmark-only peer; skipped if not importable).

Reported per shape: decode (M = ``--decode-m`` tokens, default 1) median and min time with the weights cache-hot
(each variant called repeatedly, as in a GEMV microbenchmark) and the speed-up over bf16 (ratio of medians), the
median with the weights streamed (variants called round-robin, each evicting the others from the caches, as the
layers of a model do in a decode step), weight bytes (qweight + scales + zeros, as the module holds them) and the
ratio to bf16, prefill time at ``--prefill-m`` tokens (default 16 and 128; the minimum over the runs, the least disturbed
by other jobs on a shared machine) and its speed-up, and the decode output's
relative error against the float64 product with the module's own dequantized weight (the kernel's error; the
quantization error is not shown; for torchao: against the bf16 weight, i.e. including its quantization error).

    python benchmarks/weight_only_decode.py [--shapes 4096x4096 11008x4096 4096x11008] [--reps 40] [--threads N]
        [--decode-m 1] [--prefill-m 16 128] [--skip-peers] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, machine_summary, module_bytes  # noqa: E402


def hot_times(fns: dict, reps: int, rounds: int = 3, warmup: int = 3) -> dict:
    """``{name: [ms, ...]}``: each function timed ``reps`` times in a row (its weights stay in cache, as in a GEMV
    microbenchmark), the whole set repeated ``rounds`` times in turn (so that a busy machine slows all alike)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for k, fn in fns.items():
                for _ in range(warmup):
                    fn()
                for _ in range(max(1, reps // rounds)):
                    t0 = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def streamed_times(fns: dict, reps: int, warmup: int = 2) -> dict:
    """``{name: [ms, ...]}``: each rep calls every function once, in turn: the other variants' weights evict this
    one's from the caches, as the other layers do in a model's decode step (the weights stream from memory)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def torchao_int4(lin: nn.Module, group_size: int, filter_fn=None):
    """A copy of ``lin`` (a Linear or a model: its Linears passing ``filter_fn(module, name)``) on torchao's int4
    weight-only CPU path (torch's int4pack kernel), under the API of the installed torchao."""
    from torchao.quantization import quantize_

    def configs():
        try:  # torchao >= 0.18: the CPU (opaque) int4 tensor lives in the prototype namespace
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            yield PrototypeInt4WeightOnlyConfig(group_size=group_size)
        except ImportError:
            pass
        from torchao.quantization import Int4WeightOnlyConfig

        yield Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="opaque")  # 0.14 - 0.17
        from torchao.dtypes import Int4CPULayout

        yield Int4WeightOnlyConfig(group_size=group_size, layout=Int4CPULayout())  # older

    errors = []
    try:
        for config in configs():
            m = copy.deepcopy(lin)
            try:
                quantize_(m, config, filter_fn=filter_fn)
                return m
            except Exception as e:  # API differences between torchao versions
                errors.append(f"{type(e).__name__}: {e}")
    except ImportError as e:
        errors.append(f"{type(e).__name__}: {e}")
    raise RuntimeError("; ".join(errors))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="N x K")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--decode-m", type=int, default=1)
    p.add_argument("--prefill-m", type=int, nargs="*", default=[16, 128])
    p.add_argument("--reps", type=int, default=40, help="decode reps (prefill: reps / 4, at least 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--skip-peers", action="store_true", help="skip torchao")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import effalg.kernels as K
    from effalg.core.modules import WeightOnlyLinear
    from effalg.kernels import weight_only_cpu as woc

    t_start = time.perf_counter()
    native = woc.native_available()
    print(f"# weight-only decode: {machine_summary()}")
    print(
        f"# native kernels: {native}, AVX-512 VBMI/BF16 path: {native and woc._fast_isa()}, "
        f"layout W3: {K.weight_only_cpu_layout(3, 4096, 4096, a.group_size)}, "
        f"W4: {K.weight_only_cpu_layout(4, 4096, 4096, a.group_size)}; group size {a.group_size}, bf16 activations\n"
    )
    rows, records = [], []
    for shape in a.shapes:
        N, Kd = (int(v) for v in shape.lower().split("x"))
        torch.manual_seed(0)
        lin = nn.Linear(Kd, N, bias=False)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        lin16 = copy.deepcopy(lin).to(torch.bfloat16).eval()
        variants = {"bf16": lin16}
        for bits in (4, 3):
            variants[f"effalg W{bits}"] = WeightOnlyLinear.from_float(
                lin16, bits=bits, group_size=a.group_size, symmetric=False
            )
        for bits in (4, 3):
            if woc.blocked_layout_ok(bits, Kd, a.group_size):
                m = WeightOnlyLinear.from_float(
                    lin16, bits=bits, group_size=a.group_size, symmetric=False, prepack=False
                )
                variants[f"effalg W{bits} blocked"] = m.prepack_(layout="blocked")
        if woc._int4pack_supported() and N % 64 == 0:
            m = WeightOnlyLinear.from_float(lin16, bits=4, group_size=a.group_size, symmetric=False, prepack=False)
            variants["effalg W4 int4pack"] = m.prepack_(layout="int4pack")
        if not a.skip_peers:
            try:
                variants["torchao int4 wo"] = torchao_int4(lin16, a.group_size)
            except Exception as e:
                print(f"  torchao skipped: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        x = torch.randn(a.decode_m, Kd).to(torch.bfloat16)
        calls = {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}
        dec, streamed = hot_times(calls, a.reps), streamed_times(calls, a.reps)
        pre = {}
        for pm in a.prefill_m:
            xp = torch.randn(pm, Kd).to(torch.bfloat16)
            pre[pm] = hot_times({k: (lambda m=m, xp=xp: m(xp)) for k, m in variants.items()}, max(6, a.reps // 4), 2, 1)
        bytes16 = module_bytes(lin16)
        base, sbase = statistics.median(dec["bf16"]), statistics.median(streamed["bf16"])
        for name, m in variants.items():
            med, mn, smed = statistics.median(dec[name]), min(dec[name]), statistics.median(streamed[name])
            wbytes = module_bytes(m)
            with torch.inference_mode():
                y = m(x).double()
                if isinstance(m, WeightOnlyLinear):
                    ref = x.double() @ m.dequantize_weight(torch.float64).t()
                else:
                    ref = x.double() @ lin16.weight.double().t()
            err = float((y - ref).norm() / ref.norm())
            rec = {
                "shape": shape,
                "variant": name,
                "decode_ms": med,
                "decode_min_ms": mn,
                "decode_speedup": base / med,
                "decode_streamed_ms": smed,
                "decode_streamed_speedup": sbase / smed,
                "weight_bytes": wbytes,
                "bytes_ratio": bytes16 / wbytes,
                "rel_err": err,
                "layout": getattr(m, "packed_layout", None),
            }
            prefill_cells = []
            for pm, t in pre.items():
                pmin = min(t[name])  # long calls: the fastest run is the least disturbed by other jobs
                rec[f"prefill{pm}_ms"], rec[f"prefill{pm}_median_ms"] = pmin, statistics.median(t[name])
                rec[f"prefill{pm}_speedup"] = min(t["bf16"]) / pmin
                prefill_cells.append(f"{pmin:.2f} ({rec[f'prefill{pm}_speedup']:.2f}x)")
            records.append(rec)
            rows.append(
                [
                    shape,
                    name,
                    f"{med:.3f} / {mn:.3f}",
                    f"{rec['decode_speedup']:.2f}x",
                    f"{smed:.3f} ({rec['decode_streamed_speedup']:.2f}x)",
                    f"{wbytes / 2**20:.2f}",
                    f"{rec['bytes_ratio']:.2f}x",
                    *prefill_cells,
                    f"{err:.1e}",
                ]
            )
        print(f"  {shape}: done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
    heads = [
        "N x K",
        "variant",
        f"decode M={a.decode_m} ms median / min",
        "decode speed-up vs bf16",
        "decode streamed ms (speed-up)",
        "weight MiB",
        "bytes vs bf16",
        *[f"prefill M={pm} min ms (speed-up)" for pm in a.prefill_m],
        "rel. err (kernel)",
    ]
    print(format_table(heads, rows))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
