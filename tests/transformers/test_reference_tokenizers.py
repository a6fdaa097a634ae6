"""The reference models' word-level tokenizers (built in effalg.transformers.reference_models, not in core)."""

import torch

from effalg.core.eval import lm_tasks, shapes, vlm
from effalg.core.eval.reference import LM_NAME, T2I_NAME, VLM_NAME, reference_models_dir
from effalg.transformers.reference_models import (
    build_lm_tokenizer,
    build_shapes_clip_tokenizer,
    build_shapes_tokenizer,
    build_vlm_processor,
    build_vlm_tokenizer,
)

SD_T2I_NAME = "tiny-sd-shapes"  # effalg.diffusers.reference_models.SD_T2I_NAME (not imported: transformers-only test)


def test_lm_tokenizer_matches_vocab():
    tok = build_lm_tokenizer()
    assert tok.convert_tokens_to_ids(lm_tasks.VOCAB) == list(range(len(lm_tasks.VOCAB)))
    assert tok("def k3 v7").input_ids == [lm_tasks.DEF, lm_tasks.KEY0 + 3, lm_tasks.VALUE0 + 7]


def test_shapes_tokenizer_covers_captions_and_appends_eos():
    tok = build_shapes_tokenizer()
    ids = tok("A Red circle on a blue background").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[:-1]) == ["a", "red", "circle", "on", "a", "blue", "background"]
    assert set(tok.convert_tokens_to_ids(shapes.WORDS)).isdisjoint({tok.pad_token_id, tok.eos_token_id, 2})


def test_shapes_clip_tokenizer_is_word_level_with_bos_eos_padding():
    tok = build_shapes_clip_tokenizer()
    assert type(tok).__name__ == "CLIPTokenizer" and tok.model_max_length == 12
    for word in shapes.WORDS:  # every caption word is one token
        assert len(tok(word).input_ids) == 3, word
    ids = tok("A Red  circle on a blue background", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.convert_ids_to_tokens(ids[:9]) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>",
        "<|endoftext|>",
    ]  # fmt: skip
    assert ids[9:] == [tok.pad_token_id] * 3 and tok.pad_token_id == tok.eos_token_id == 1 and tok.bos_token_id == 0
    assert tok("", padding="max_length", max_length=12).input_ids == [0] + [1] * 11
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle on a blue background"


def test_vlm_tokenizer_and_processor():
    tok = build_vlm_tokenizer()
    assert tok.image_token == vlm.IMAGE_TOKEN and tok.convert_tokens_to_ids(vlm.IMAGE_TOKEN) == 4
    for word in vlm.WORDS:  # every prompt / answer word is one token
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("<image><image> Question: what shape is it ? answer: circle").input_ids
    assert ids[:3] == [tok.bos_token_id, 4, 4] and tok.unk_token_id not in ids  # a run of <image> splits per token
    assert tok.decode(ids, skip_special_tokens=True) == "question: what shape is it ? answer: circle"
    proc = build_vlm_processor(patch_size=4)
    img = vlm.to_uint8(shapes.render("circle", "red", "blue", torch.Generator().manual_seed(0)))
    enc = proc(text=[vlm.prompt("shape")], images=[img], return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, 32, 32)
    assert int((enc["input_ids"] == 4).sum()) == 64 and enc["input_ids"].shape[1] == 1 + 64 + 7


def test_same_vocab_as_the_committed_reference_models():
    """The builders reproduce the token ids saved with the trained reference models (where those exist)."""
    try:
        root = reference_models_dir()
    except FileNotFoundError:
        return
    from transformers import AutoTokenizer

    for name, build, sub in (
        (LM_NAME, build_lm_tokenizer, ""),
        (T2I_NAME, build_shapes_tokenizer, "tokenizer"),
        (SD_T2I_NAME, build_shapes_clip_tokenizer, "tokenizer"),
        (VLM_NAME, build_vlm_tokenizer, ""),
    ):
        folder = root / name / sub
        if (folder / "tokenizer.json").is_file():
            # (the committed LM tokenizer also holds an added ``<|endoftext|>`` after the task vocabulary)
            saved = AutoTokenizer.from_pretrained(folder).get_vocab()
            assert build().get_vocab().items() <= saved.items(), name
