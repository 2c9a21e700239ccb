"""Language-model cross-entropy with optional label smoothing and z-loss, computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over non-ignored tokens. `metrics["ce"]` is the plain cross-entropy (for perplexity); the returned
    loss adds label smoothing (torch's definition) and `z_loss * mean(logsumexp(logits)^2)` (PaLM)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    targets = labels.reshape(-1)
    ce = F.cross_entropy(flat, targets, ignore_index=ignore_index)
    loss = ce
    if label_smoothing > 0:
        loss = F.cross_entropy(flat, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
    metrics = {"ce": ce.detach()}
    if z_loss > 0:
        valid = targets != ignore_index
        lse = torch.logsumexp(flat, dim=-1)
        z = (lse.pow(2) * valid).sum() / valid.sum().clamp(min=1)
        loss = loss + z_loss * z
        metrics["z_loss"] = z.detach()
    return loss, metrics
