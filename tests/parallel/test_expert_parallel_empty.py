"""Expert parallelism when a rank's experts get no tokens: its backward must still join the all-to-alls (an
autograd graph cut at the empty expert input left the other rank waiting forever, e.g. in the pipeline's metadata
pass on uninitialized inputs). Two gloo ranks, every token routed to the experts of EP rank 1; the outputs and
the input and expert gradients equal one process's."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.experts import apply_expert_parallel
from pretrain.model.moe import MoE, MoEConfig

CFG = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1, score_func="sigmoid")


def _layer() -> MoE:
    torch.manual_seed(0)
    layer = MoE(16, 8, CFG)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layer.router.expert_bias.copy_(torch.tensor([-100.0, -100.0, 100.0, 100.0]))  # only experts 2, 3 (EP rank 1)
    return layer


def _worker(rank: int, init_file: str, out: str) -> None:
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    layer = _layer()
    apply_expert_parallel(layer, dist.new_group([0, 1]))
    x = torch.randn(2, 2, 6, 16, generator=torch.Generator().manual_seed(1))[rank].requires_grad_()
    out_tensor = layer(x)
    (out_tensor * torch.arange(out_tensor.numel()).view_as(out_tensor)).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    torch.save({"out": out_tensor.detach(), "x_grad": x.grad, "grads": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_a_rank_whose_experts_get_no_tokens_still_joins_the_backward(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result.{r}") for r in range(2)]
    reference = _layer()
    x = torch.randn(2, 2, 6, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    outs = [reference(x[r]) for r in range(2)]
    sum((o * torch.arange(o.numel()).view_as(o)).sum() for o in outs).backward()
    for r in range(2):
        assert torch.allclose(results[r]["out"], outs[r].detach(), atol=1e-5)
        assert torch.allclose(results[r]["x_grad"], x.grad[r], rtol=1e-4, atol=1e-4)
    # rank 1 holds experts 2 and 3, which saw every token of both ranks; rank 0's experts saw none
    for name in ("gate", "up", "down"):
        full = getattr(reference.experts, name).grad
        assert torch.allclose(results[1]["grads"][f"experts.{name}"], full[2:], rtol=1e-4, atol=1e-4), name
        assert results[0]["grads"][f"experts.{name}"].abs().max() == 0, name
