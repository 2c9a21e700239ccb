"""Supervised fine-tuning on chat data: packing changes no log-probability, the loss is the mean over the supervised
tokens of the whole global batch, and a fine-tuning phase starts from a pretrained checkpoint and resumes exactly."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.chat_dataset import IGNORE_INDEX, write_chat_folder
from data.chat_loader import ChatWindowLoader
from data.sources import iter_documents
from pretrain.config import load_config
from pretrain.model.documents import Documents
from pretrain.trainer import Trainer

from .conftest import SFT
from .test_train_e2e import StopAfter, run, train_losses


def test_a_packed_conversation_has_the_log_probs_it_has_alone(tiny_overrides, tiny_chat):
    cfg = load_config(None, [*tiny_overrides, *SFT, f"data.dir={tiny_chat}"])
    torch.manual_seed(0)
    model = cfg.model.build().eval()
    dataset = ChatWindowLoader(cfg.data, micro_batch_size=1, global_batch_size=1).dataset
    _, tokens, _, documents = dataset[0]
    tokens, documents = torch.from_numpy(tokens[None, :-1]), torch.from_numpy(documents[None, :-1])
    assert documents.max() >= 2  # at least two conversations and padding
    with torch.no_grad():
        packed = F.log_softmax(model(tokens, documents=Documents(documents, restart_positions=True)), dim=-1)
        for number in documents.unique().tolist()[:-1]:
            span = (documents[0] == number).nonzero().flatten()
            alone = torch.full_like(tokens, dataset.pad_id)
            alone[0, :len(span)] = tokens[0, span]
            alone_documents = (torch.arange(tokens.shape[1]) >= len(span)).long()[None]
            single = F.log_softmax(model(alone, documents=Documents(alone_documents, restart_positions=True)), -1)
            torch.testing.assert_close(packed[0, span], single[0, :len(span)], atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def uneven_chat(tmp_path_factory, tiny_data):
    """One conversation per window, alternately a long question with a one-word reply and a short question with a
    long reply: the supervised share of a window is ~2% or ~90%."""
    texts = [t for t in itertools.islice(iter_documents("fortunes"), 400) if len(t.split()) >= 60][:8]
    conversations = []
    for i, text in enumerate(texts):
        words = text.split()
        long, short = " ".join(words[:28]), " ".join(words[:2])
        user, reply = (long, words[40]) if i % 2 == 0 else (short, long)
        conversations.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
    out = tmp_path_factory.mktemp("uneven_chat")
    write_chat_folder(out, {"train": conversations, "val": conversations[:2]}, tiny_data / "tokenizer.json")
    return out


def first_step_gradients(overrides, run_dir):
    trainer = Trainer(load_config(None, overrides), run_dir)
    if trainer.cfg.train.init_from:  # as fit() starts a phase
        trainer.initialize_from(Path(trainer.cfg.train.init_from))
    if trainer.objective is not None:
        trainer.objective.take_reference(trainer.model)
    grads = {}

    def capture(optimizer, args, kwargs):
        grads.update({name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(capture)
    metrics = trainer.train_step()
    return grads, metrics, trainer


def test_accumulation_gives_the_gradient_of_one_batch_over_its_supervised_tokens(tiny_overrides, uneven_chat,
                                                                                 tmp_path):
    base = [*tiny_overrides, *SFT, f"data.dir={uneven_chat}", "optim.grad_clip=0", "train.global_batch_size=4",
            "tracking.mlflow=false"]
    accumulated, acc_metrics, trainer = first_step_gradients([*base, "train.micro_batch_size=1"], tmp_path / "a")
    one_batch, one_metrics, _ = first_step_gradients([*base, "train.micro_batch_size=4"], tmp_path / "b")

    # by hand: one forward over the same four windows, the summed token losses over the supervised count
    reference = Trainer(load_config(None, [*base, "train.micro_batch_size=4"]), tmp_path / "c")
    batch = next(reference.train_loader)
    labels = batch["labels"]
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    assert counts.max() > 10 * counts.min()  # very different supervised shares per micro-batch
    logits = reference.forward(batch["input_ids"], labels, batch["document_ids"]).float()
    token_losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    (token_losses.sum() / counts.sum()).backward(retain_graph=True)
    expected = {name: p.grad for name, p in reference.model.named_parameters() if p.grad is not None}

    scale = max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-5 * scale, rtol=0, msg=name)
        torch.testing.assert_close(one_batch[name], grad, atol=1e-5 * scale, rtol=0, msg=name)
    assert acc_metrics["loss"] == pytest.approx(token_losses.sum().item() / counts.sum().item(), rel=1e-5)
    assert one_metrics["loss"] == pytest.approx(acc_metrics["loss"], rel=1e-5)
    assert acc_metrics["supervised_tokens"] == counts.sum().item()

    # what averaging the micro-batches' means would give instead is far off: the comparison above can tell
    expected = {name: grad.clone() for name, grad in expected.items()}
    reference.model.zero_grad()
    torch.stack([token_losses.view_as(labels)[i].sum() / counts[i] for i in range(4)]).mean().backward()
    naive = dict(reference.model.named_parameters())
    assert max((naive[name].grad - grad).abs().max().item() for name, grad in expected.items()) > 1e-2 * scale


def test_the_validation_loss_is_the_mean_over_every_supervised_token_read(tiny_overrides, uneven_chat, tmp_path):
    overrides = [*tiny_overrides, *SFT, f"data.dir={uneven_chat}", "train.micro_batch_size=1",
                 "train.global_batch_size=1", "train.eval_batches=2", "tracking.mlflow=false"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")
    val_loss = trainer.evaluate()["val_loss"]
    trainer.val_loader.reset()
    sums, counts = [], []
    with torch.no_grad():
        for _ in range(2):
            batch = next(trainer.val_loader)
            logits = trainer.forward(batch["input_ids"], None, batch["document_ids"]).float()
            losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            sums.append(losses.sum().item())
            counts.append((batch["labels"] != IGNORE_INDEX).sum().item())
    assert max(counts) > 10 * min(counts)  # one short reply, one long: the two means weigh very differently
    assert val_loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert abs(val_loss - (sums[0] / counts[0] + sums[1] / counts[1]) / 2) > 1e-2  # not the mean of the means


def test_a_fine_tuning_phase_starts_from_pretrained_weights_and_resumes_exactly(tiny_overrides, tiny_chat,
                                                                                base_run, tmp_path):
    overrides = [*tiny_overrides, *SFT, f"data.dir={tiny_chat}", f"train.init_from={base_run['checkpoint']}",
                 "train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
                 "train.checkpoint_every=2", "tracking.mlflow=false", "tracking.progress_bar=false"]
    full = run(overrides, tmp_path / "full")
    assert full["initialized_from"]["step"] == 4
    assert 0 < full["supervised_tokens"] < full["tokens"]
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(overrides, crashed, extra_callbacks=[StopAfter(2)])
    resumed = run(overrides, crashed, resume="auto")
    assert train_losses(crashed) == train_losses(tmp_path / "full")
    assert resumed["supervised_tokens"] == full["supervised_tokens"]
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
