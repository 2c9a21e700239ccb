"""`train.compile`: a dense block and the dropless MoE block (shared experts, auxiliary-loss balancing, load
statistics) are each one graph for torch.compile, as `nn.Module.compile` traces them (no graph break), forward
and backward, with bf16 autocast as on a GPU; and a compiled training run (inductor, CPU: scripts/install.sh brings
g++ with the dev extra) follows the eager one."""

import json

import pytest
import torch

from pretrain.model import ModelConfig, Transformer
from pretrain.model.moe import MoEConfig

MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, num_shared_experts=1, first_k_dense=0,
                aux_loss_weight=0.01, bias_update_rate=0.01)


@pytest.mark.parametrize("moe", [MoEConfig(), MOE], ids=["dense", "moe"])
def test_a_block_is_one_graph(moe):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                    moe=moe)).train()
    block = model.layers[0]
    cos, sin = model.rope(16)
    x = torch.randn(2, 16, 64, requires_grad=True)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(block)(x, cos, sin)  # as `block.compile()` traces it: breaks allowed
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        want = block(x, cos, sin)
        got = torch.compile(block, backend="aot_eager")(x, cos, sin)
    torch._dynamo.reset()
    assert torch.allclose(got.float(), want.float(), atol=1e-2)
    got.float().square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_a_compiled_run_follows_the_eager_run(tmp_path, tiny_data, monkeypatch):
    from tests.parallel.cli_runs import train, train_metrics

    small = ["train.steps=3", "model.n_layers=2", "train.eval_every=3", "train.checkpoint_every=3"]
    train(tiny_data, tmp_path / "eager", *small)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    train(tiny_data, tmp_path / "compiled", *small, "train.compile=true")
    assert list((tmp_path / "inductor").rglob("*.py"))  # inductor generated the blocks' code
    eager, compiled = train_metrics(tmp_path / "eager"), train_metrics(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step in compiled:
        assert abs(compiled[step]["loss"] - eager[step]["loss"]) < 1e-4, (step, compiled[step], eager[step])
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compile_first_step_seconds"] > 0
    assert "compile_first_step_seconds" not in json.loads((tmp_path / "eager" / "summary.json").read_text())
