"""Model card written next to saved effalg-quantized models."""

from __future__ import annotations

import os

__all__ = ["write_model_card", "save_quantized"]


def write_model_card(
    save_directory: str, quantization_config, base_model: str | None = None, repo_id: str | None = None
) -> str:
    """Write ``README.md`` (front matter + how to load) into ``save_directory``; returns its path."""
    method = quantization_config.quant_method
    tags = ["effalg", method] + ([quantization_config.method_tag] if hasattr(quantization_config, "method_tag") else [])
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {repo_id or os.path.basename(os.path.abspath(save_directory))} ({method})", ""]
    lines += [
        f"Quantized with [effalg](https://pypi.org/project/effalg-transformers/) `{method}`: "
        f"`{quantization_config.to_dict()}`.",
        "",
        "The plugin must be imported before loading (otherwise transformers loads the packed integer weights as garbage):",
        "",
        "```python",
        "import effalg.transformers  # registers the effalg quantization methods",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id or save_directory}")',
        "```",
        "",
    ]
    path = os.path.join(save_directory, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def save_quantized(
    model, save_directory: str, base_model: str | None = None, repo_id: str | None = None, **kwargs
) -> str:
    """``model.save_pretrained(save_directory, **kwargs)`` plus the model card; returns ``save_directory``."""
    model.save_pretrained(save_directory, **kwargs)
    qc = model.config.quantization_config
    if base_model is None:
        base_model = getattr(model.config, "_effalg_base_model", None) or None
    write_model_card(save_directory, qc, base_model=base_model, repo_id=repo_id)
    return save_directory
