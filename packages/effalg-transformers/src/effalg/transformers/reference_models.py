"""The repo's trained reference LM (``reference_models/tiny-qwen2-mqar``) and the word-level tokenizers of the
reference models (they are transformers tokenizer objects, so they are built here, not in core).

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
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerFast

__all__ = ["build_lm_tokenizer", "build_shapes_clip_tokenizer", "build_shapes_tokenizer", "load_reference_lm"]


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


def _word_bpe(words: list[str], suffix: str = "</w>") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE "trained" on ``words`` (each once) until every word is one token: ``(symbols, merges)`` where symbols are
    the characters, every merge result (so every ``word + suffix``) in a fixed order, and merges in rank order.
    Applying the merges in rank order replays this training exactly, so each word encodes to its single token."""
    seqs = [[*w[:-1], w[-1] + suffix] for w in words]
    symbols = dict.fromkeys(s for seq in seqs for s in seq)
    merges: list[tuple[str, str]] = []
    while any(len(seq) > 1 for seq in seqs):
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda pr: (counts[pr], [-ord(c) for c in pr[0] + " " + pr[1]]))
        merges.append(best)
        symbols[best[0] + best[1]] = None
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
    return {s: i for i, s in enumerate(symbols)}, merges


def build_shapes_clip_tokenizer(max_length: int = 12) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` that is word-level over :data:`effalg.core.eval.shapes.WORDS`: every caption word is one
    token (a BPE whose merges build exactly these words), wrapped as ``<|startoftext|> ... <|endoftext|>`` and padded
    with ``<|endoftext|>`` to ``max_length`` (``model_max_length``, what ``StableDiffusionPipeline`` pads to). The
    tokenizer of ``reference_models/tiny-sd-shapes``; built offline."""
    symbols, merges = _word_bpe(list(shapes.WORDS))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({s: 2 + i for i, s in enumerate(symbols)})
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
