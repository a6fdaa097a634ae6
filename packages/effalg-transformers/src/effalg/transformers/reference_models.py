"""The repo's trained reference LM (``reference_models/tiny-qwen2-mqar``) and VLM (``reference_models/tiny-vlm-shapes``),
and the word-level tokenizers / processor of the reference models (they are transformers objects, so they are built
here, not in core).

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

from effalg.core.eval import lm_tasks, shapes, vlm
from effalg.core.eval.reference import LM_NAME, VLM_NAME, reference_models_dir
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
)

__all__ = [
    "build_lm_tokenizer",
    "build_shapes_clip_tokenizer",
    "build_shapes_tokenizer",
    "build_vlm_processor",
    "build_vlm_tokenizer",
    "load_reference_lm",
    "load_reference_vlm",
]


def load_reference_lm(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(Qwen2ForCausalLM, tokenizer)`` trained on the MQAR + digit-reversal task (:mod:`effalg.core.eval.lm_tasks`).

    ``path`` defaults to ``reference_models_dir() / "tiny-qwen2-mqar"``.
    """
    p = path or reference_models_dir() / LM_NAME
    model = AutoModelForCausalLM.from_pretrained(p).to(device).eval()
    return model, AutoTokenizer.from_pretrained(p)


def load_reference_vlm(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` trained to answer questions about the shapes images
    (:mod:`effalg.core.eval.vlm`: shape / colour / background, one word each).

    ``path`` defaults to ``reference_models_dir() / "tiny-vlm-shapes"``. Score it with
    ``effalg.core.eval.evaluate_vlm(model, processor)``; calibration samples: ``effalg.core.eval.vlm_samples``.
    """
    p = path or reference_models_dir() / VLM_NAME
    model = AutoModelForImageTextToText.from_pretrained(p).to(device).eval()
    return model, AutoProcessor.from_pretrained(p)


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


def build_vlm_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level ``PreTrainedTokenizerFast`` over :data:`effalg.core.eval.vlm.WORDS` (lower-cased) with the
    special tokens ``<pad>`` 0, ``<s>`` 1 (prepended), ``</s>`` 2 (ends every answer), ``<unk>`` 3 and the image
    placeholder ``<image>`` 4 (``tokenizer.image_token``; an added special token, so the processor's run of
    ``<image><image>...`` splits into one token each). The tokenizer of ``reference_models/tiny-vlm-shapes``."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, vlm.IMAGE_TOKEN: 4}
    for wd in vlm.WORDS:
        vocab[wd] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": vlm.IMAGE_TOKEN},
        model_max_length=256,
    )


def build_vlm_processor(image_size: int = shapes.SIZE, patch_size: int = 4) -> Any:
    """``LlavaProcessor``: a ``CLIPImageProcessor`` at ``image_size`` (resize + centre crop, CLIP mean / std) and
    :func:`build_vlm_tokenizer`; ``<image>`` expands to ``(image_size // patch_size) ** 2`` tokens (the CLIP tower's
    patches, its CLS token dropped: ``vision_feature_select_strategy="default"``)."""
    import transformers
    from transformers import LlavaProcessor

    # Without torchvision transformers falls back to the PIL backend anyway (with a warning); both save as
    # "CLIPImageProcessor", so the folder loads with whichever backend the reader has.
    try:
        import torchvision  # noqa: F401

        cls = transformers.CLIPImageProcessor
    except ImportError:
        cls = transformers.CLIPImageProcessorPil
    ip = cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=build_vlm_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
