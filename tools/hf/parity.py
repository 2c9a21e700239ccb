"""How closely an exported model's logits follow ours: the largest absolute difference and the mean KL divergence
(ours || theirs, nats per position), measured in float32 through transformers itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tools.hf import ConversionError

# a wrong mapping (a swapped projection, a permuted head, another RoPE) moves logits by O(1); fp32 rounding by ~1e-6
TOLERANCE = 1e-3


def logits_parity(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    ours, theirs = ours.double(), theirs.double()
    log_p, log_q = F.log_softmax(ours, -1), F.log_softmax(theirs, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return {"max_abs_diff": float((ours - theirs).abs().max()), "kl": float(kl)}


def load_transformers_model(folder: Path) -> nn.Module:
    """The folder's model in float32 through transformers' own loading; a weight it did not find, did not expect
    or had to reshape is an error (transformers would initialize it randomly and only warn). The MTP layers of a
    DeepSeek-V3 layout (`num_nextn_predict_layers` after the main layers) are expected unused."""
    import json

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    layers = config.get("num_hidden_layers", 0)
    mtp = tuple(f"model.layers.{layers + k}." for k in range(config.get("num_nextn_predict_layers") or 0))
    if mtp:
        info["unexpected_keys"] = [key for key in info.get("unexpected_keys", []) if not key.startswith(mtp)]
    problems = {key: sorted(value) for key, value in info.items() if value}
    if problems:
        raise ConversionError(f"transformers loads {folder} with {problems}")
    return model.eval()


@torch.no_grad()
def measure_parity(ours: nn.Module, folder: Path, vocab_size: int, length: int, windows: int = 2,
                   seed: int = 0) -> dict[str, Any]:
    """Logits of `windows` windows of `length` seeded random tokens, ours against the exported folder's; an error
    when they differ by more than TOLERANCE x the largest logit (at least 1)."""
    import transformers

    theirs = load_transformers_model(folder)
    ids = torch.randint(0, vocab_size, (windows, length), generator=torch.Generator().manual_seed(seed))
    ours.eval()
    expected, got = ours(ids), theirs(input_ids=ids).logits
    parity = logits_parity(expected, got) | {"windows": windows, "tokens_per_window": length,
                                             "tokens": "seeded random ids", "transformers": transformers.__version__}
    if parity["max_abs_diff"] > TOLERANCE * max(1.0, float(expected.abs().max())):
        raise ConversionError(f"the exported model's logits differ from the checkpoint's: {parity}")
    return parity
