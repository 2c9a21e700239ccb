"""Held-out answer accuracy of a fine-tuned chat model: each validation conversation's last assistant reply is
generated greedily from the conversation before it and compared with the reference, exactly (after normalizing case,
spaces and end punctuation) and by word-overlap F1 (SQuAD's)."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import torch

from data.chat import ChatTemplate
from data.chat_dataset import ChatManifest
from data.tokenizer import load_tokenizer
from pretrain.decoding import generate_batch

EXTRA_TOKENS = 8  # generated beyond the reference answer's length, so a longer answer shows as wrong


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".!?;:,").strip()


def word_f1(answer: str, reference: str) -> float:
    got, want = normalize(answer).split(), normalize(reference).split()
    common = sum((collections.Counter(got) & collections.Counter(want)).values())
    if not got or not want or common == 0:
        return float(got == want)
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def held_out_questions(data_dir: Path, manifest: ChatManifest, count: int) -> list[dict[str, Any]]:
    """The first `count` validation conversations, as (messages before the last reply, the reply)."""
    if "val" not in manifest.splits:
        raise ValueError(f"{data_dir} has no validation split to take held-out questions from")
    questions = []
    with open(data_dir / manifest.splits["val"]["file"], encoding="utf-8") as lines:
        for line in lines:
            if len(questions) == count:
                break
            if line.strip():
                messages = json.loads(line)["messages"]
                questions.append({"messages": messages[:-1], "reference": messages[-1]["content"]})
    return questions


@torch.no_grad()
def sft_answers(loaded, data_dir: Path, count: int, examples: int = 5) -> dict[str, Any]:
    manifest = ChatManifest.load(data_dir)
    template = ChatTemplate(load_tokenizer(data_dir / manifest.tokenizer_file))
    exact, f1, shown = 0, 0.0, []
    questions = held_out_questions(data_dir, manifest, count)
    for question in questions:
        prompt = template.prompt(question["messages"])
        budget = len(template.tokenizer.encode(question["reference"]).ids) + EXTRA_TOKENS
        budget = min(budget, loaded.cfg.model.max_seq_len - len(prompt))
        with loaded.autocast():  # greedy, ending at the reply's end-of-turn token
            new = generate_batch(loaded.model, [prompt], max(budget, 1), stop_ids={template.end_of_turn},
                                 pad_id=manifest.pad_id)[0]
        answer = template.tokenizer.decode(new)
        exact += normalize(answer) == normalize(question["reference"])
        f1 += word_f1(answer, question["reference"])
        if len(shown) < examples:
            shown.append({"question": question["messages"][-1]["content"], "answer": answer,
                          "reference": question["reference"]})
    return {"data_dir": str(data_dir), "questions": len(questions), "exact_match": exact / len(questions),
            "f1": f1 / len(questions), "examples": shown}
