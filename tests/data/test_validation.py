"""qwenvl/data/validation.py: the structure tokens a sample's text may not hold come from its family."""

from __future__ import annotations

import dataclasses

import pytest

from qwenvl.data.chat import BadSampleError, SampleRef
from qwenvl.data.validation import STRUCTURE_TOKENS, SampleValidator, check_record
from qwenvl.data.vision import VisionConfig
from qwenvl.models import FAMILIES, SpecialTokens, family_for


def _record(question: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "A square."}]}


# A family whose chat turns start with another token than Qwen's <|im_start|> (no released one does yet).
OTHER = dataclasses.replace(family_for("qwen2_5_vl"), tokens=SpecialTokens(im_start="<|turn_start|>"))


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if not f.uses_processor_items))
def test_every_family_refuses_the_tokens_refused_without_one(model_type):
    """The Qwen families share Qwen's tokens, so passing the family changes nothing for them."""
    family = FAMILIES[model_type]
    assert set(family.tokens.structure()) == set(STRUCTURE_TOKENS)
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"):
        for given in (None, family):
            with pytest.raises(BadSampleError) as info:
                check_record(_record(f"What is {token}?"), "d.json", 4, given)
            assert str(info.value) == (f"d.json:4: user text contains {token}, a token that structures the chat; "
                                       f"remove it from the data")
            assert info.value.kind == "special_token_in_text"
    check_record(_record("Where is <|box_start|>(1,2),(3,4)<|box_end|>?"), "d.json", 4, family)  # grounding: fine


def test_the_family_s_own_structure_tokens_are_refused():
    with pytest.raises(BadSampleError) as info:
        check_record(_record("Say <|turn_start|> twice."), "d.json", 7, OTHER)
    assert str(info.value) == ("d.json:7: user text contains <|turn_start|>, a token that structures the chat; "
                               "remove it from the data")
    check_record(_record("Say <|turn_start|> twice."), "d.json", 7)  # not a token of Qwen's families
    # <|im_start|> is plain text for a family that does not use it
    assert check_record(_record("Say <|im_start|> twice."), "d.json", 7, OTHER).conversation.turns[0] == (
        "user", "Say <|im_start|> twice.")


def test_the_validator_checks_with_its_family():
    ref = SampleRef("d", "d.json", "", 2)
    problem = SampleValidator(VisionConfig(), family=OTHER).validate(_record("Hi <|turn_start|>"), ref)
    assert (problem.kind, problem.message) == (
        "special_token_in_text",
        "d.json:2: user text contains <|turn_start|>, a token that structures the chat; remove it from the data")
    assert SampleValidator(VisionConfig()).validate(_record("Hi <|turn_start|>"), ref) is None


def test_an_hf_processor_family_refuses_its_own_tokens_only():
    """LLaVA: its tokenizer's bos/eos structure the chat; Qwen's tokens are plain text; <image> is the media tag."""
    family = family_for("llava")
    with pytest.raises(BadSampleError) as info:
        check_record(_record("Say </s> twice."), "d.json", 3, family)
    assert str(info.value) == "d.json:3: user text contains </s>, a token that structures the chat; remove it from the data"
    assert check_record(_record("Say <|im_start|> twice."), "d.json", 3, family).conversation.turns[0] == (
        "user", "Say <|im_start|> twice.")
