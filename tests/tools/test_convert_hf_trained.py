"""Trained MoE models export exactly: a tiny GQA + MoE + MTP model (-> Glm4MoeForCausalLM) and an MLA + MoE + MTP
model (-> DeepseekV3ForCausalLM), each trained 16 steps on real text so that the router weights, the
auxiliary-loss-free selection biases and the experts have moved from their initialization, give our logits through
transformers on validation text (fp32) and our greedy tokens, with their MTP layers kept."""

import numpy as np
import pytest
import torch

from pretrain.consolidate import full_tensors
from tests.conftest import TINY_MODEL
from tests.tools.test_convert_hf import FP32_TOLERANCE, assert_same_greedy, compare_logits, val_docs
from tools.convert_hf import export_hf

MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=32", "model.moe.num_shared_experts=1",
       "model.moe.first_k_dense=1", "model.moe.score_func=sigmoid", "model.moe.bias_update_rate=0.01",
       "model.moe.aux_loss_weight=0.001", "model.n_layers=3", "model.mtp_depth=1", "model.tie_embeddings=false"]
MLA = ["model.attention=mla", "model.mla.q_lora_rank=32", "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=16",
       "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=16", "model.norm_eps=1e-6"]
TRAIN = ["train.steps=16", "train.log_every=4", "train.eval_every=16", "train.eval_batches=1",
         "train.checkpoint_every=16", "tracking.mlflow=false", "tracking.progress_bar=false", "optim.lr=3e-3"]


def train(tiny_data, run_dir, extra):
    from pretrain.callbacks import default_callbacks
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(None, [*TINY_MODEL, f"data.dir={tiny_data}", *MOE, *TRAIN, *extra])
    Trainer(cfg, run_dir, default_callbacks(cfg, run_dir)).fit()
    return run_dir / "checkpoints" / "step_00000016"


@pytest.mark.parametrize("name,extra,architecture", [("gqa", [], "Glm4MoeForCausalLM"),
                                                     ("mla", MLA, "DeepseekV3ForCausalLM")])
def test_a_trained_moe_mtp_model_exports_with_our_logits_on_validation_text(name, extra, architecture, tiny_data,
                                                                            tmp_path):
    checkpoint = train(tiny_data, tmp_path / "run", extra)
    biases = {k: v for k, v in full_tensors(checkpoint).items() if k.endswith("expert_bias")}
    assert biases and all(v.abs().max() > 0 for v in biases.values())  # the balancing has moved the routing
    record = export_hf(checkpoint, tmp_path / "hf", verify=True)
    assert record["target"]["architecture"] == architecture and record["mtp"]["written"] == 1
    windows = torch.from_numpy(np.concatenate(val_docs(tiny_data))[:256].astype(np.int64)).view(4, 64)
    parity = compare_logits(checkpoint, tmp_path / "hf", windows)
    print(f"{architecture} after 16 steps, validation text 4 x 64 tokens: {parity}")
    assert parity["max_abs_diff"] < FP32_TOLERANCE and parity["kl"] < 1e-9
    assert_same_greedy(checkpoint, tmp_path / "hf", [windows[0, :8].tolist(), windows[1, :5].tolist()], 16)
