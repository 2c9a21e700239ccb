"""Our tokenizer as Hugging Face tokenizer files: `tokenizer.json` as trained (byte-level BPE, no post-processor,
so nothing is added to encoded text, as in our data), `tokenizer_config.json` naming the special tokens and holding
the chat template of data/chat.py in Jinja, and the ids a `generation_config.json` stops and pads with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from data.chat import END_OF_TURN, ROLE_TOKENS
from data.tokenizer import BOS, CHAT_TOKENS, EOS, PAD, load_tokenizer
from tools.hf import ConversionError

# <|bos|> then per message <|role|> content <|end_of_turn|>, then <|assistant|> to ask for a reply (data/chat.py)
CHAT_TEMPLATE = (
    "{% set role_tokens = " + json.dumps(ROLE_TOKENS) + " %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in role_tokens %}"
    "{{ raise_exception('a message role is system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ role_tokens[message['role']] + message['content'] + '" + END_OF_TURN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ role_tokens['assistant'] }}{% endif %}"
)


def special_ids(tokenizer_json: Path) -> dict[str, int]:
    tokenizer = load_tokenizer(tokenizer_json)
    ids = {token: tokenizer.token_to_id(token) for token in (BOS, EOS, PAD, *CHAT_TOKENS)}
    missing = [token for token, token_id in ids.items() if token_id is None]
    if missing:
        raise ConversionError(f"{tokenizer_json} lacks the special tokens {missing}: it is not a tokenizer of "
                              "`pretrain data prepare`")
    return ids | {"vocab_size": tokenizer.get_vocab_size()}


def write_tokenizer_files(tokenizer_json: Path, out: Path, max_length: int) -> dict[str, int]:
    """Writes the tokenizer files into `out` and returns the special tokens' ids."""
    ids = special_ids(tokenizer_json)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": list(CHAT_TOKENS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ids


def generation_config(ids: dict[str, int]) -> dict[str, Any]:
    """Generation ends at <|eos|> or <|end_of_turn|> (the end of a chat reply), as `pretrain generate --chat`."""
    return {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[END_OF_TURN]], "pad_token_id": ids[PAD]}
