"""The chat template: conversations as token ids over the tokenizer's reserved chat tokens, with the positions a
supervised fine-tuning loss learns from (every assistant reply and the end-of-turn token that closes it).

    <|bos|> [<|system|> text <|end_of_turn|>] <|user|> text <|end_of_turn|> <|assistant|> text <|end_of_turn|> ...

The supervised positions come from the same pass that lays out the tokens, so the mask cannot drift from the
template. Special tokens are split out by the tokenizer before byte-level BPE runs, so encoding the pieces one by one
gives the ids encoding the whole rendered string would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from data.tokenizer import BOS, CHAT_TOKENS

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = dict(zip(ROLES, CHAT_TOKENS[:3], strict=True))
END_OF_TURN = CHAT_TOKENS[3]


class ChatFormatError(ValueError):
    """A conversation that breaks the chat format; the message names its file and line."""


@dataclass(frozen=True)
class RenderedConversation:
    ids: np.ndarray  # int64 [n]
    supervised: np.ndarray  # bool [n]: the positions whose token the loss learns to predict

    def __len__(self) -> int:
        return len(self.ids)


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.bos = self._special(BOS)
        self.role_ids = {role: self._special(token) for role, token in ROLE_TOKENS.items()}
        self.end_of_turn = self._special(END_OF_TURN)

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ChatFormatError(f"the tokenizer has no {token} token: prepare the data with this framework's "
                                  "tokenizer (`pretrain data prepare`), which reserves the chat tokens")
        return token_id

    def render(self, messages: Any, where: str = "conversation") -> RenderedConversation:
        """Token ids and supervised positions of a complete conversation (it must end with an assistant reply)."""
        check_messages(messages, where)
        ids, supervised = [self.bos], [False]
        for message in messages:
            learned = message["role"] == "assistant"
            content = self.tokenizer.encode(message["content"], add_special_tokens=False).ids
            ids += [self.role_ids[message["role"]], *content, self.end_of_turn]
            supervised += [False, *[learned] * len(content), learned]
        if not any(supervised):
            raise ChatFormatError(f"{where}: no assistant token to learn from (an empty loss mask)")
        return RenderedConversation(np.asarray(ids, dtype=np.int64), np.asarray(supervised, dtype=bool))

    def prompt(self, messages: Any, where: str = "prompt") -> list[int]:
        """Ids that ask the model for the next assistant reply: the conversation so far (ending with a user turn),
        then the assistant's role token."""
        check_messages(messages, where, complete=False)
        ids = [self.bos]
        for message in messages:
            content = self.tokenizer.encode(message["content"], add_special_tokens=False).ids
            ids += [self.role_ids[message["role"]], *content, self.end_of_turn]
        return [*ids, self.role_ids["assistant"]]


def check_messages(messages: Any, where: str, complete: bool = True) -> None:
    """An optional system message first, then user and assistant turns in alternation, starting with the user;
    `complete`: ending with a non-empty assistant reply (a training example), else with a user turn (a prompt)."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatFormatError(f"{where}: message {index} needs a string 'content' (and a 'role')")
        if message.get("role") not in ROLES:
            raise ChatFormatError(f"{where}: message {index} has role {message.get('role')!r}, not one of {ROLES}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = index + len(messages) - len(turns)
            raise ChatFormatError(f"{where}: message {position} is a {message['role']} turn where a {expected} turn "
                                  "belongs (an optional system message first, then user and assistant in turn)")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ChatFormatError(f"{where}: message {index + len(messages) - len(turns)} is an empty assistant turn")
    last = turns[-1]["role"] if turns else "system"
    if complete and last != "assistant":
        raise ChatFormatError(f"{where}: the conversation ends with a {last} turn; a training example ends with "
                              "the assistant's reply")
    if not complete and last != "user":
        raise ChatFormatError(f"{where}: a prompt ends with a user turn, not a {last} turn")
