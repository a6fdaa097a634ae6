"""Train the reference causal LM (Qwen2 with grouped-query attention) on MQAR + digit reversal.

Usage (from the repo root)::

    nice -n 19 .venv/bin/python reference_models/train_lm.py --out reference_models/tiny-qwen2-mqar

Deterministic: fixed seeds, single-threaded CPU, a fixed step budget; the curriculum (128 -> 256 -> 512 -> 1024
tokens) advances when the running retrieval accuracy of the current stage passes ``--advance-acc`` (a
deterministic function of the seeded run). ``--max-minutes`` is only a safety cap (the run logs if it hit it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _pkg in ("effalg-kernels", "effalg-core", "effalg-transformers"):
    sys.path.insert(0, str(REPO / "packages" / _pkg / "src"))

from effalg.core.eval import lm_tasks  # noqa: E402
from effalg.core.eval.lm import evaluate_lm  # noqa: E402
from effalg.transformers.reference_models import build_lm_tokenizer  # noqa: E402


def build_model(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=lm_tasks.PAD,
        bos_token_id=lm_tasks.BOS,
        eos_token_id=lm_tasks.SEMI,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(cfg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(REPO / "reference_models" / "tiny-qwen2-mqar"))
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--stages", default="128,256,512,1024")
    p.add_argument("--advance-acc", type=float, default=0.9)
    p.add_argument("--stage-max-steps", type=int, default=1000, help="advance anyway after this many steps")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    stages = [int(s) for s in args.stages.split(",")]
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 1)
    stage, run_acc, stage_start = 0, 0.0, 0
    t0 = time.time()
    history = []
    step = 0
    for step in range(1, args.steps + 1):
        warm = min(1.0, step / 50)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        # Mostly the current stage, sometimes an earlier one (keeps short contexts working).
        length = stages[stage]
        if stage > 0 and torch.rand((), generator=gen).item() < 0.25:
            length = stages[int(torch.randint(0, stage, (), generator=gen))]
        bs = max(1, args.tokens_per_step // length)
        batch = lm_tasks.make_batch(bs, length, gen=gen)
        out = model(input_ids=batch.input_ids, labels=batch.labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            pred = out.logits[:, :-1].argmax(-1)
            tgt = batch.labels[:, 1:]
            m = batch.kinds[:, 1:] == lm_tasks.KIND_RETRIEVAL
            acc = (pred[m] == tgt[m]).float().mean().item()
            ml = batch.kinds[:, 1:] == lm_tasks.KIND_LOCAL
            local_acc = (pred[ml] == tgt[ml]).float().mean().item()
        if length == stages[stage]:
            run_acc = 0.9 * run_acc + 0.1 * acc
            stuck = step - stage_start >= args.stage_max_steps
            if (run_acc > args.advance_acc or stuck) and stage + 1 < len(stages):
                stage += 1
                stage_start = step
                run_acc = 0.0
                print(f"step {step}: advance to length {stages[stage]}", flush=True)
                history.append({"step": step, "advance_to": stages[stage]})
        if step % 25 == 0:
            el = (time.time() - t0) / 60
            print(
                f"step {step} len {length} loss {out.loss.item():.3f} ret_acc {acc:.3f} run {run_acc:.3f} "
                f"local_acc {local_acc:.3f} "
                f"lr {lr:.2e} {el:.1f} min",
                flush=True,
            )
        if (time.time() - t0) / 60 > args.max_minutes:
            print(f"hit --max-minutes at step {step}", flush=True)
            history.append({"step": step, "stopped": "max-minutes"})
            break
    minutes = (time.time() - t0) / 60
    out_dir = Path(args.out)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    build_lm_tokenizer().save_pretrained(out_dir)
    res = evaluate_lm(model, lengths=tuple(s for s in (128, 256, 512, 1024, 2048)), n_seqs=16, seed=1234)
    metrics = {
        "train": {
            "steps": step,
            "minutes": round(minutes, 1),
            "final_stage_length": stages[stage],
            "curriculum": history,
            "args": vars(args),
            "params": n_params,
        },
        "eval": res,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
