"""Expert parallelism computes a layer's shared experts while its dispatch all-to-all is in flight (one rank of
EP=2 under torch's fake process group, whose collectives complete without moving data: the order is what is
checked here; the values are proven by the EP equivalence tests in test_moe_parallel.py, which all have a shared
expert)."""

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from parallel.grid import GridShape, ProcessGrid
from parallel.plan import PipelineOptions, parallelize
from pretrain.config import load_config
from pretrain.model.moe import MoE

SMALL_MOE = ["model.vocab_size=512", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
             "model.max_seq_len=64", "data.seq_len=64", "model.moe.expert_hidden=32", "model.moe.num_shared_experts=1",
             "parallel.dp=2", "parallel.ep=2", "train.micro_batch_size=2"]


def test_shared_experts_run_while_the_dispatched_tokens_travel():
    cfg = load_config("configs/tiny_moe.yaml", SMALL_MOE, check_paths=False)
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        torch.manual_seed(0)
        model = cfg.model.build()
        parallelize(model, ProcessGrid.build(GridShape(dp=2, ep=2), 2, 0), False, 25,
                    PipelineOptions(seq_len=64, micro_batch_size=2))
        layer = next(m for m in model.modules() if isinstance(m, MoE))
        seen = []
        layer.shared.register_forward_pre_hook(lambda *_: seen.append(layer.experts.dispatching))
        out = layer(torch.randn(2, 64, 64, requires_grad=True))
        out.float().sum().backward()
    finally:
        dist.destroy_process_group()
    assert seen == [True]  # once, during the dispatch
    assert not layer.experts.dispatching and layer.experts.meanwhile is None
    assert layer.shared.gate_proj.weight.grad is not None  # its graph was recorded while the exchange ran
