"""The prompts of `pretrain generate`, as token ids: `--prompt TEXT` (repeatable) and `--prompts-file F`, either plain
text with one prompt per line (blank lines skipped) or, for a .jsonl/.json file, one JSON object per line with a
"prompt" string or a "messages" list (chat turns, ending with a user turn; needs --chat).

A plain prompt follows an EOS, as every document does in the packed training stream (data/loader.py joins documents
with EOS). With --chat, a text becomes one user message (after the --system message, if given) and the ids are the
chat template's request for the assistant's reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from data.chat import ChatFormatError, ChatTemplate
from data.tokenizer import EOS
from pretrain.config import ConfigError


@dataclass(frozen=True)
class Prompt:
    given: str | list[dict[str, str]]  # the text, or the messages, as the user gave them
    ids: list[int]

    def shown(self) -> str:
        if isinstance(self.given, str):
            return self.given
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.given)


def read_prompt_records(texts: list[str], prompts_file: str | None) -> list[tuple[str, str | list]]:
    """(where, text or messages) of every prompt: the --prompt texts, then the file's."""
    records: list[tuple[str, str | list]] = [(f"--prompt #{i + 1}", text) for i, text in enumerate(texts)]
    if prompts_file is None:
        return records
    path = Path(prompts_file)
    if not path.is_file():
        raise ConfigError("--prompts-file", f"{path} is not a file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix not in (".jsonl", ".json"):
        return records + [(f"{path}:{n}", line) for n, line in enumerate(lines, start=1) if line.strip()]
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError("--prompts-file", f"{path}:{n} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt", record.get("messages")), str | list):
            raise ConfigError("--prompts-file", f"{path}:{n} needs a \"prompt\" string or a \"messages\" list")
        records.append((f"{path}:{n}", record["prompt"] if "prompt" in record else record["messages"]))
    return records


def encode_prompts(records: list[tuple[str, str | list]], tokenizer: Tokenizer, chat: bool,
                   system: str | None) -> list[Prompt]:
    if not records:
        raise ConfigError("--prompt", "no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    template = _template(tokenizer) if chat else None
    eos = tokenizer.token_to_id(EOS)
    prompts = []
    for where, given in records:
        if isinstance(given, str) and not given.strip():
            raise ConfigError("--prompt", f"{where} is empty: give the model some text to continue")
        if template is None:
            if not isinstance(given, str):
                raise ConfigError("--chat", f"{where} holds chat messages: pass --chat to use the chat template")
            prompts.append(Prompt(given, [eos, *tokenizer.encode(given, add_special_tokens=False).ids]))
            continue
        messages: list[Any] = [{"role": "user", "content": given}] if isinstance(given, str) else given
        if system is not None and not (messages and isinstance(messages[0], dict)
                                       and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system}, *messages]
        try:
            prompts.append(Prompt(given, template.prompt(messages, where)))
        except ChatFormatError as exc:
            raise ConfigError("--prompts-file", str(exc)) from None
    return prompts


def _template(tokenizer: Tokenizer) -> ChatTemplate:
    try:
        return ChatTemplate(tokenizer)
    except ChatFormatError as exc:
        raise ConfigError("--chat", str(exc)) from None
