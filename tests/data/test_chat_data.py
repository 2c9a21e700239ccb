"""Chat data for supervised fine-tuning: the template's loss mask, bad records, packing, and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.chat import ChatFormatError, ChatTemplate
from data.chat_dataset import IGNORE_INDEX, read_conversations, write_chat_folder
from data.chat_loader import ChatWindowLoader
from data.tokenizer import load_tokenizer
from tests.data.conftest import data_cfg, fortune_conversations

SEQ_LEN = 192


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory, tiny_dir, fortunes_texts):
    out = tmp_path_factory.mktemp("chat")
    write_chat_folder(out, {"train": fortune_conversations(fortunes_texts, 120),
                            "val": fortune_conversations(fortunes_texts, 10, offset=120)}, tiny_dir / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def template(tiny_dir):
    return ChatTemplate(load_tokenizer(tiny_dir / "tokenizer.json"))


def chat_cfg(folder, **kw):
    return data_cfg(folder, format="chat", document_masking=True, **{"seq_len": SEQ_LEN, **kw})


def test_the_loss_mask_covers_assistant_replies_and_their_end_of_turn_only(template):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "Shakespeare."}, {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "About 1600."}]
    rendered = template.render(messages)
    decode = template.tokenizer.decode
    supervised_text = decode(rendered.ids[rendered.supervised].tolist(), skip_special_tokens=False)
    assert supervised_text == "Shakespeare.<|end_of_turn|>About 1600.<|end_of_turn|>"
    whole = ("<|bos|><|system|>Be brief.<|end_of_turn|><|user|>Who wrote Hamlet?<|end_of_turn|><|assistant|>"
             "Shakespeare.<|end_of_turn|><|user|>When?<|end_of_turn|><|assistant|>About 1600.<|end_of_turn|>")
    assert rendered.ids.tolist() == template.tokenizer.encode(whole).ids  # piecewise = whole-string encoding
    prompt = template.prompt(messages[:2])
    assert decode(prompt, skip_special_tokens=False).endswith("Hamlet?<|end_of_turn|><|assistant|>")


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "user", "content": "Hi"}], "ends with a user turn"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], "empty assistant turn"),
    ([{"role": "assistant", "content": "Hi"}], "assistant turn where a user turn belongs"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system turn where"),
    ([{"role": "bot", "content": "Hi"}], "has role 'bot'"),
    ([{"role": "user"}], "needs a string 'content'"),
    ([], "non-empty list"),
])
def test_a_broken_conversation_is_an_error_naming_its_file_and_line(template, tmp_path, messages, message):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    path.write_text(f"{good}\n\n{json.dumps({'messages': messages})}\n")
    with pytest.raises(ChatFormatError, match=f"{path}:3: .*{message}"):
        read_conversations(path, template, 64, skip_invalid=False)
    conversations, skipped = read_conversations(path, template, 64, skip_invalid=True)
    assert (len(conversations), skipped) == (1, 1)


@pytest.mark.parametrize(("line", "message"), [
    (b"{not json\n", "not a JSON object"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "not UTF-8"),
    (b'{"text": "pretraining record"}\n', "'messages' list"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "word " * 200}]}).encode() + b"\n",
     "tokens, more than a window holds"),
])
def test_unreadable_or_oversized_lines_name_file_and_line(template, tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(line)
    with pytest.raises(ChatFormatError, match=f"{path}:1: .*{message}"):
        read_conversations(path, template, 64, skip_invalid=False)


def test_an_epoch_packs_every_conversation_once_in_whole_windows(chat_dir, template):
    loader = ChatWindowLoader(chat_cfg(chat_dir), micro_batch_size=1, global_batch_size=1)
    expected = read_conversations(chat_dir / "train.jsonl", template, SEQ_LEN + 1, False)[0]
    windows = loader.windows_per_epoch
    assert windows < len(expected) / 2  # several conversations share a window
    seen = []
    for g in range(windows):
        _, tokens, supervised, documents = loader.dataset[g]
        for document in np.unique(documents):
            span = documents == document
            if supervised[span].any():  # padding: its own document, nothing supervised
                seen.append(tuple(tokens[span].tolist()))
        batch = next(loader)
        labels, ids = batch["labels"][0], batch["input_ids"][0]
        learned = labels != IGNORE_INDEX
        assert learned.any() and (labels[:-1][learned[:-1]] == ids[1:][learned[:-1]]).all()  # the next token
    assert sorted(seen) == sorted(tuple(c.ids.tolist()) for c in expected)
    epoch0 = [window.tolist() for window in loader.dataset.epoch_windows(0)]
    assert sorted(i for w in epoch0 for i in w) == list(range(len(expected)))
    assert epoch0 != [window.tolist() for window in loader.dataset.epoch_windows(1)]


def test_labels_never_cross_into_the_next_conversation(chat_dir):
    batch = next(ChatWindowLoader(chat_cfg(chat_dir), micro_batch_size=4, global_batch_size=4))
    docs, labels = batch["document_ids"], batch["labels"]
    last_of_document = docs[:, :-1] != docs[:, 1:]
    assert last_of_document.any()
    assert (labels[:, :-1][last_of_document] == IGNORE_INDEX).all()


def read_steps(loaders, steps):
    out = {}
    for _ in range(steps):
        for loader in loaders:
            for _ in range(loader.per_rank // loader.micro_batch_size):
                batch = next(loader)
                for g, ids in zip(batch["window_ids"].tolist(), batch["input_ids"], strict=True):
                    out[g] = ids
    return out


def test_resume_on_another_number_of_ranks_reads_each_window_once(chat_dir):
    cfg = chat_cfg(chat_dir)
    reference = read_steps([ChatWindowLoader(cfg, micro_batch_size=2, global_batch_size=4)], 5)
    two = [ChatWindowLoader(cfg, micro_batch_size=1, global_batch_size=4, dp_rank=r, dp_size=2) for r in range(2)]
    got = read_steps(two, 2)
    one = ChatWindowLoader(cfg, micro_batch_size=4, global_batch_size=4)
    one.load_state_dict(two[0].state_dict())
    got |= read_steps([one], 3)
    assert sorted(got) == sorted(reference) == list(range(20))
    assert all(np.array_equal(got[g], reference[g]) for g in reference)
