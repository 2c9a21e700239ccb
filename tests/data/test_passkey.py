import random

import pytest

from data.passkey import FILLER, QUESTION, build_prompt, key_sentence, prompt_text, random_key
from data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def encode(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir / "tokenizer.json")
    return lambda text: tokenizer.encode(text).ids


@pytest.mark.parametrize("length", [200, 400, 777])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_is_the_longest_that_fits_with_the_key_at_its_depth(encode, length, depth, tiny_dir):
    tokenizer = load_tokenizer(tiny_dir / "tokenizer.json")
    key = random_key(random.Random(length))
    prompt = build_prompt(encode, key, length, depth)
    assert len(prompt.token_ids) <= length
    text = tokenizer.decode(prompt.token_ids)
    assert text.endswith(QUESTION) and key_sentence(key) in text
    before, after = text.split(key_sentence(key))
    fillers_before, fillers_after = before.count(FILLER), after.count(FILLER)
    total = fillers_before + fillers_after
    assert fillers_before == round(total * depth)
    more = total + 1
    assert len(encode(prompt_text(key, round(more * depth), more - round(more * depth)))) > length  # the longest


def test_prompt_too_short_and_bad_depth_are_errors(encode):
    with pytest.raises(ValueError, match="even without filler"):
        build_prompt(encode, "12345", 10, 0.5)
    with pytest.raises(ValueError, match="depth"):
        build_prompt(encode, "12345", 500, 1.5)
