"""A real SLURM on this machine for the launch tests: munged, slurmctld and slurmd on 127.0.0.1, started by
scripts/slurm/start-local-slurm.sh (which installs Debian's slurm-wlm and munge when missing) and stopped at the end
of the session — unless they were already running, then they are reused and left running."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPTS = ROOT / "scripts" / "slurm"


def _daemons_alive(home: Path) -> bool:
    def alive(pid_file: Path) -> bool:
        try:
            os.kill(int(pid_file.read_text()), 0)
            return True
        except (OSError, ValueError):
            return False

    return alive(home / "run" / "slurmctld.pid") and alive(home / "run" / "slurmd.pid")


@pytest.fixture(scope="session")
def local_slurm():
    """SLURM_CONF of the running local cluster (also exported into this process, for every client command)."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root: it installs slurm-wlm and munge and starts their daemons")
    home = Path(os.environ.get("SLURM_HOME", "/tmp/local-slurm"))
    was_running = _daemons_alive(home)
    result = subprocess.run(["bash", str(SCRIPTS / "start-local-slurm.sh")], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "SLURM_HOME": str(home)})
    if result.returncode != 0:
        if shutil.which("slurmctld") is None or shutil.which("munged") is None:
            pytest.skip(f"SLURM could not be installed (apt-get install slurm-wlm munge failed): "
                        f"{result.stderr.strip()[-600:]}")
        pytest.fail(f"the local SLURM did not start:\n{result.stderr[-3000:]}")
    conf = result.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        subprocess.run(["bash", str(SCRIPTS / "stop-local-slurm.sh")], env={**os.environ, "SLURM_HOME": str(home)},
                       timeout=60)
