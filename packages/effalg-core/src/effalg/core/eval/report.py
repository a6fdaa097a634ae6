"""Plain-text tables of evaluation results."""

from __future__ import annotations

from typing import Any

_LM_COLS = [("retrieval_acc", "retr"), ("local_acc", "local"), ("loss", "loss")]
_T2I_COLS = [("shape_acc", "shape"), ("color_acc", "color"), ("bg_acc", "bg"), ("all_acc", "all"), ("frechet", "FD")]
_VLM_COLS = [("shape_acc", "shape"), ("color_acc", "color"), ("bg_acc", "bg"), ("all_acc", "all"), ("loss", "loss")]


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_table(results: dict[str, dict[str, Any]] | list[tuple[str, dict[str, Any]]]) -> str:
    """One row per named result (``{"fp32": res, "w3": res}``) from :func:`evaluate_lm` / :func:`evaluate_t2i` /
    :func:`evaluate_vlm`.

    LM rows also get one retrieval-accuracy column per evaluated context length.
    """
    items = list(results.items()) if isinstance(results, dict) else list(results)
    if not items:
        return ""
    lines = []
    for task in ("lm", "t2i", "vlm"):
        rows = [(n, r) for n, r in items if r.get("task") == task]
        if not rows:
            continue
        if task == "lm":
            cols = list(_LM_COLS)
            lengths = [str(x) for x in rows[0][1].get("by_length", {})]
            head = ["model"] + [c[1] for c in cols] + [f"retr@{x}" for x in lengths]
            body = [
                [n]
                + [_fmt(r[c[0]]) for c in cols]
                + [_fmt(r["by_length"].get(x, {}).get("retrieval_acc", "-")) for x in lengths]
                for n, r in rows
            ]
        elif task == "vlm":
            cols = list(_VLM_COLS)
            head = ["model"] + [c[1] for c in cols]
            body = [[n] + [_fmt(r[c[0]]) for c in cols] for n, r in rows]
        else:
            cols = list(_T2I_COLS)
            head = ["model", "steps"] + [c[1] for c in cols]
            body = [[n, str(r.get("num_inference_steps", "-"))] + [_fmt(r[c[0]]) for c in cols] for n, r in rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        for row in [head] + body:
            lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
