"""The static guard that keeps CPU tensors out of tensor collectives (NCCL rejects them; CI's gloo does not)."""

import textwrap
from pathlib import Path

import pytest

from tools.check_collective_devices import DEFAULT_PATHS, check_paths, check_source

ROOT = Path(__file__).resolve().parents[2]


def test_the_training_code_sends_no_cpu_tensor_to_a_collective():
    findings, checked = check_paths([ROOT / p for p in DEFAULT_PATHS])
    assert findings == []
    assert checked >= 20  # every all-reduce, broadcast, send/recv, all-to-all and TP gather/scatter was looked at


@pytest.mark.parametrize("body,reason", [
    # the save path the issue describes: shards copied to the host, then gathered
    ("shard = param.detach().cpu()\nparts = [torch.empty_like(shard) for _ in range(2)]\n"
     "dist.all_gather(parts, shard, group=group)", ".cpu()"),
    ("flag = torch.tensor([1.0])\ndist.all_reduce(flag)", "torch.tensor(...) without device="),
    ("buf = torch.zeros(4, device='cpu')\ntorch.distributed.broadcast(buf, src=0)", 'device="cpu"'),
    ("dist.send(h.to('cpu'), dst=1)", '.to("cpu")'),
    ("out = torch.empty(8)\ndist.all_to_all_single(out, x, group=g)", "torch.empty(...) without device="),
])
def test_host_tensors_reaching_a_collective_are_flagged(body, reason):
    source = "def save(param, x, h, g, group):\n" + textwrap.indent(body, "    ")
    findings, checked = check_source(source, "snippet.py")
    assert checked == 1 and len(findings) == 1 and reason in findings[0] and "snippet.py:" in findings[0]


def test_tensors_on_the_training_device_pass():
    source = textwrap.dedent("""
        def step(grad, device, group):
            flag = torch.tensor([1], device=device)
            dist.all_reduce(flag)
            full = torch.zeros((4, 4), dtype=grad.dtype, device=grad.device)
            dist.all_reduce(full, group=group)
            dist.broadcast_object_list([grad.cpu()], src=0)  # object collectives pick their own device
    """)
    assert check_source(source, "ok.py") == ([], 2)
