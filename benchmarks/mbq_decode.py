"""End-to-end decode speed and weight bytes of MBQ-style weight-only decoders on the CPU: bf16 vs effalg W4 / W3
(group 128, asymmetric: the layouts MBQ saves) vs torchao int4 weight-only, in one run.

A LlamaForCausalLM with Llama-7B projections (hidden 4096, MLP 11008, 32 heads x 128) and ``--layers`` layers
(2 by default: 24 GiB of RAM), a small vocabulary (the LM head stays bf16 in every variant, as MBQ leaves it), bf16
activations. Each variant decodes ``--new-tokens`` tokens greedily after an ``--prompt``-token prompt with a
``DynamicCache``; tokens/s is measured on the decode steps only. The decoder layers' weight bytes (packed codes +
scales + zeros) and their ratio to bf16 are reported. The effalg rows are quantized with
``from_pretrained(..., quantization_config=EffalgLinearConfig(weight_bits=b, act_bits=None, weight_group_size=128,
weight_symmetric=False))``: the modules and kernels an MBQ checkpoint loads into (MBQ only changes the weights'
values through its folded scales).

    python benchmarks/mbq_decode.py [--layers 2] [--prompt 32] [--new-tokens 16] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, machine_summary, module_bytes  # noqa: E402


def build(layers: int, vocab: int, path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    return model


def decode_tps(model, prompt: int, new: int, reps: int) -> float:
    """Greedy decode tokens/s (the prefill excluded), best of ``reps``."""
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    best = 0.0
    with torch.inference_mode():
        for _ in range(reps):
            cache = DynamicCache(config=model.config)
            out = model(ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new):
                out = model(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            best = max(best, new / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(machine_summary())
    from transformers import AutoModelForCausalLM

    import effalg.transformers  # noqa: F401
    from effalg.transformers import EffalgLinearConfig

    def in_layers(name: str) -> bool:
        return name.startswith("model.layers.")

    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = build(args.layers, args.vocab, d)
        base_bytes = module_bytes(model, in_layers)
        base_tps = decode_tps(model, args.prompt, args.new_tokens, args.reps)
        rows.append({"variant": "bf16", "tps": base_tps, "speedup": 1.0, "bytes": base_bytes, "bytes_ratio": 1.0})
        print(rows[-1], flush=True)
        del model
        for bits in (4, 3):
            cfg = EffalgLinearConfig(weight_bits=bits, act_bits=None, weight_group_size=128, weight_symmetric=False)
            q = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, quantization_config=cfg).eval()
            b = module_bytes(q, in_layers)
            tps = decode_tps(q, args.prompt, args.new_tokens, args.reps)
            rows.append({"variant": f"effalg W{bits} g128", "tps": tps, "speedup": tps / base_tps, "bytes": b,
                         "bytes_ratio": base_bytes / b})  # fmt: skip
            print(rows[-1], flush=True)
            del q
        try:
            from weight_only_decode import torchao_int4

            t = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
            t = torchao_int4(t, 128, lambda m, n: isinstance(m, torch.nn.Linear) and in_layers(n))
            b = module_bytes(t, in_layers)
            tps = decode_tps(t, args.prompt, args.new_tokens, args.reps)
            rows.append({"variant": "torchao int4 weight-only g128", "tps": tps, "speedup": tps / base_tps, "bytes": b,
                         "bytes_ratio": base_bytes / b})  # fmt: skip
            print(rows[-1], flush=True)
        except Exception as e:  # a benchmark-only peer: skip its row when missing or failing
            print(f"torchao row skipped: {type(e).__name__}: {e}")
    print(f"\nDecode, Llama-7B projections x {args.layers} layers, bf16 activations, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens")  # fmt: skip
    print(format_table(
        ["variant", "decode tok/s", "vs bf16", "decoder weight MiB", "bytes vs bf16"],
        [[r["variant"], f"{r['tps']:.2f}", f"{r['speedup']:.2f}x", f"{r['bytes'] / 2**20:.0f}",
          f"{r['bytes_ratio']:.2f}x"] for r in rows],
    ))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
