"""The repo's trained reference LM (``reference_models/tiny-qwen2-mqar``) and the word-level tokenizers of both
reference models (they are transformers ``PreTrainedTokenizerFast`` objects, so they are built here, not in core).

The framework-free parts (task generators, checker, scoring, where the weights live) stay in
:mod:`effalg.core.eval`; the reference text-to-image pipeline is loaded by :mod:`effalg.diffusers.reference_models`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing

from effalg.core.eval import lm_tasks, shapes
from effalg.core.eval.reference import LM_NAME, reference_models_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["build_lm_tokenizer", "build_shapes_tokenizer", "load_reference_lm"]


def load_reference_lm(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(Qwen2ForCausalLM, tokenizer)`` trained on the MQAR + digit-reversal task (:mod:`effalg.core.eval.lm_tasks`).

    ``path`` defaults to ``reference_models_dir() / "tiny-qwen2-mqar"``.
    """
    p = path or reference_models_dir() / LM_NAME
    model = AutoModelForCausalLM.from_pretrained(p).to(device).eval()
    return model, AutoTokenizer.from_pretrained(p)


def build_lm_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast`` over :data:`effalg.core.eval.lm_tasks.VOCAB` (whitespace-separated
    tokens); the tokenizer saved with the reference LM."""
    tok = Tokenizer(WordLevel(vocab=dict(lm_tasks.TOKEN_TO_ID), unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<pad>")


def build_shapes_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level ``PreTrainedTokenizerFast`` over :data:`effalg.core.eval.shapes.WORDS` (lower-cased); appends
    ``</s>`` like T5's tokenizer. The tokenizer of the reference text-to-image pipeline."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for wd in shapes.WORDS:
        vocab[wd] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=120
    )
