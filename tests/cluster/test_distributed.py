"""How a process finds its place: torchrun's variables, srun's, and the rendezvous derived from a SLURM job."""

import pytest

from cluster.distributed import env_from_launcher, first_host, nccl_watchdog_environment, slurm_rendezvous
from cluster.launch import Nodes, strip_launch_options, torchrun_command


@pytest.mark.parametrize("nodelist,first", [
    ("node07", "node07"), ("node[03-05,9]", "node03"), ("gpu[12,14-15],cpu1", "gpu12"), ("a1,a2", "a1"),
    ("rack2-n[001-128]", "rack2-n001"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_slurm_rendezvous_from_the_job():
    env = {"SLURM_JOB_NODELIST": "node[03-05]", "SLURM_JOB_ID": "123456"}
    assert slurm_rendezvous(env) == ("node03", str(20000 + 123456 % 30000))
    assert slurm_rendezvous({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}) == ("10.0.0.1", "6000")


def test_launcher_variables(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert env_from_launcher().world_size == 1
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # an srun step of 8 tasks
    env = env_from_launcher()
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's variables win
    assert env_from_launcher().world_size == 4


def test_multi_node_torchrun_command_and_options_stripped():
    cmd = torchrun_command(4, ["train", "c.yaml"], Nodes(2, 1, "node03", 29600))
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--master-addr=node03" in cmd
    assert "--master-port=29600" in cmd and "--standalone" not in cmd
    assert "--standalone" in torchrun_command(4, ["train"])
    argv = ["train", "c.yaml", "--nproc", "2", "--nnodes=2", "--node-rank", "1", "--master-addr", "h",
            "--master-port=1", "x.y=1"]
    assert strip_launch_options(argv) == ["train", "c.yaml", "x.y=1"]


def test_bad_node_options_are_config_errors_naming_the_option(tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--dry-run", *args,
                               f"data.dir={tmp_path}"], capture_output=True, text=True, timeout=120)

    bad_rank = cli("--nproc", "2", "--nnodes", "2", "--node-rank", "3")
    assert bad_rank.returncode == 2 and "config error at '--node-rank'" in bad_rank.stderr
    bad_port = cli("--nproc", "2", "--nnodes", "2", "--master-port", "70000")
    assert bad_port.returncode == 2 and "config error at '--master-port'" in bad_port.stderr
    no_nproc = cli("--nnodes", "2")
    assert no_nproc.returncode == 2 and "needs --nproc" in no_nproc.stderr


def test_nccl_watchdog_settings_surface_errors_in_python_and_keep_the_users():
    """NCCL cannot run here (one process per GPU); what is checked is the environment the NCCL path applies:
    communicator abort without killing the process (so the trainer's named error is raised), the flight recorder
    dumped on timeout, and any value the user set left alone."""
    applied = nccl_watchdog_environment({})
    assert applied["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert int(applied["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0 and applied["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    mine = nccl_watchdog_environment({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_TRACE_BUFFER_SIZE": "0"})
    assert set(mine) == {"TORCH_NCCL_DUMP_ON_TIMEOUT"}


def test_finish_distributed_tears_the_process_groups_down(tmp_path):
    """A finished rank leaves no gloo group alive for the interpreter's teardown (where its destructors can abort
    the process: "terminate called without an active exception", seen on a rank of a finished DeepSpeed job)."""
    import torch.distributed as dist

    from cluster.distributed import finish_distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    dist.new_group([0])
    finish_distributed()
    assert not dist.is_initialized()
    finish_distributed()  # nothing to do: no error
