"""A multi-node launch: two launch agents on loopback act as two nodes of 2 processes each and form one 4-rank
job (TP=2 inside each node, DP=2 across the nodes) that trains exactly like one process."""

import os
import subprocess
import sys

from tests.parallel.cli_runs import ROOT, assert_curve_matches, overrides
from tests.pretrain.conftest import free_port


def test_two_nodes_form_one_job_equal_to_one_process(parallel_data, single, tmp_path):
    single_dir, _ = single
    run_dir, port = tmp_path / "run", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "pretrain.cli", "train", "configs/tiny.yaml", "--run-dir", str(run_dir),
               *overrides(parallel_data), "parallel.tp=2", "parallel.dp=2", "--nproc", "2", "--nnodes", "2",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    for node in nodes:
        out, _ = node.communicate(timeout=600)
        outputs.append(out)
        assert node.returncode == 0, out[-4000:]
    assert "4 process(es) tp=2 pp=1 dp=2" in outputs[0]  # node 0 holds global rank 0, which reports
    assert_curve_matches(run_dir, single_dir)
