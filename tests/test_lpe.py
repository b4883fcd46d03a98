"""LPE prompt building and caption merging."""

from __future__ import annotations


from core.settings.stages import CaptionConfig
from factory.preflight import known_word_forms
from factory.stages.caption import build_prompts, clean_caption, merge_captions


def test_merge_keeps_phrases_most_captions_agree_on() -> None:
    captions = [
        "a man wearing a red shirt, blue jeans and a backpack",
        "a man wearing a red shirt, blue jeans",
        "a man wearing a red shirt, black jeans and a backpack",
    ]
    merged = merge_captions(captions)
    assert "red shirt" in merged and "blue jeans" in merged and "backpack" in merged
    assert "black jeans" not in merged


def test_merge_falls_back_and_handles_empty() -> None:
    assert merge_captions([]) == ""
    assert merge_captions(["", "a person"]) == "a person"


def test_prompts_insert_iir_only_in_enhanced_prompt() -> None:
    config = CaptionConfig(iir_token="zwx")
    prompt, reference = build_prompts("red shirt, blue jeans", config)
    assert prompt == "a photo of zwx person, red shirt, blue jeans"
    assert "zwx" not in reference and "red shirt" in reference


def test_clean_caption_strips_prompt_echo() -> None:
    prompt = "Question: what is the person wearing? Answer:"
    assert clean_caption(prompt + " A Red  shirt.", prompt) == "a red shirt"


def test_iir_token_must_not_be_a_vocabulary_word() -> None:
    clip_vocab = {"red</w>": 0, "shirt</w>": 1, "sks</w>": 2}
    assert known_word_forms(clip_vocab, "zwx") == []
    assert known_word_forms(clip_vocab, "sks") == ["sks</w>"]
    assert known_word_forms(clip_vocab, "SKS") == ["sks</w>"]  # CLIP lower-cases its input
    assert known_word_forms({"\u0120sks": 0}, "sks") == ["\u0120sks"]  # GPT-2 / OPT byte-level BPE
