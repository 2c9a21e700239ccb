"""Document masking in packed windows: a document's logits do not depend on the other documents of its window,
with restarted positions they equal the document alone, and the loader marks documents at EOS."""

import pytest
import torch

from pretrain.model import ModelConfig, Transformer
from pretrain.model.config import MLAConfig
from pretrain.model.documents import Documents, positions_in_document, same_document
from pretrain.model.moe import MoEConfig

LENGTHS = (7, 12, 9)  # three documents packed in one window of 28


def model(attention: str = "gqa", mtp_depth: int = 0, moe: bool = False) -> Transformer:
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      attention=attention, mtp_depth=mtp_depth)
    if attention == "mla":
        cfg.mla = MLAConfig(q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    if moe:
        cfg.moe = MoEConfig(num_experts=4, top_k=2, num_shared_experts=1)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def packed(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 64, (1, sum(LENGTHS)), generator=g)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]).unsqueeze(0)
    return tokens, ids


def test_positions_and_mask_of_packed_documents():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_in_document(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    allowed = same_document(ids)[0, 0]
    assert allowed[4, 3] and not allowed[4, 2] and allowed[8, 5] and not allowed[5, 4]


@pytest.mark.parametrize("attention,moe", [("gqa", False), ("mla", False), ("gqa", True)])
def test_other_documents_do_not_change_a_documents_logits(attention, moe):
    net = model(attention, moe=moe)
    tokens, ids = packed(0)
    changed = tokens.clone()
    changed[0, : LENGTHS[0]] = torch.randint(2, 64, (LENGTHS[0],), generator=torch.Generator().manual_seed(9))
    later = slice(LENGTHS[0], None)
    with torch.no_grad():
        for restart in (False, True):
            documents = Documents(ids, restart_positions=restart)
            before, after = net(tokens, documents=documents), net(changed, documents=documents)
            torch.testing.assert_close(before[0, later], after[0, later], rtol=0, atol=1e-6)
        # negative control: without masking the first document leaks into the others
        assert (net(tokens)[0, later] - net(changed)[0, later]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_a_masked_document_reads_as_if_alone(attention):
    """RoPE scores depend on relative positions only, so with masking a document's logits equal those of the
    document alone whether its positions restart or continue the window's (restarting keeps the angles small)."""
    net = model(attention)
    tokens, ids = packed(1)
    start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    with torch.no_grad():
        alone = net(tokens[:, start:end])[0]
        for restart in (True, False):
            in_window = net(tokens, documents=Documents(ids, restart_positions=restart))[0, start:end]
            torch.testing.assert_close(in_window, alone, rtol=0, atol=1e-5)
        assert (net(tokens)[0, start:end] - alone).abs().max() > 1e-3  # unmasked: it sees the first document


def test_mtp_losses_respect_documents():
    net = model(mtp_depth=1).train()
    tokens, ids = packed(2)
    labels = torch.roll(tokens, -1, dims=1)
    documents = Documents(ids, restart_positions=True)
    net(tokens, labels, documents)
    masked = net.last_mtp_losses[0]
    net(tokens, labels)
    assert not torch.equal(masked, net.last_mtp_losses[0])  # the MTP block saw the masking too


def test_loader_marks_documents_at_eos(tmp_path):
    from data.loader import _collate

    eos = 1
    window = torch.tensor([5, 6, eos, 7, eos, eos, 8, 9, 3])  # docs: [5 6 EOS] [7 EOS] [EOS] [8 9 ...
    batch = _collate([(0, window)], eos=eos)
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert "document_ids" not in _collate([(0, window)])
