"""The CPU cross-entropy (chunked, fused backward) equals torch's: values and gradients, with ignored targets and
a chunk size that does not divide the rows."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import loss as loss_module
from pretrain.model.loss import ChunkedCrossEntropy, cross_entropy


@pytest.mark.parametrize("chunk_elements", [7 * 50, 1 << 21])  # 7 rows per chunk (uneven), or all rows at once
def test_chunked_cross_entropy_equals_torch(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_module, "CPU_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (torch.randn(45, 50) * 3).requires_grad_()
    targets = torch.randint(0, 50, (45,))
    targets[::4] = -100
    ours = ChunkedCrossEntropy.apply(logits, targets, -100)
    (grad_ours,) = torch.autograd.grad(ours * 1.7, logits)
    ref = F.cross_entropy(logits, targets, ignore_index=-100)
    (grad_ref,) = torch.autograd.grad(ref * 1.7, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)


def test_cross_entropy_uses_the_chunked_path_for_fp32_cpu_logits_only():
    logits = torch.randn(4, 8, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4])
    assert type(cross_entropy(logits, targets).grad_fn).__name__ == "ChunkedCrossEntropyBackward"
    assert "ChunkedCrossEntropy" not in type(cross_entropy(logits.double(), targets).grad_fn).__name__
