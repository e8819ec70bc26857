"""A real Slurm cluster (2 emulated nodes with 2 fake GPUs each) for the tests marked ``slurm``.

Installing Slurm (apt-get, root, ~15 s) happens at most once per machine and is announced on the
terminal. The cluster is stopped by PID at the end of the session, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from minpro_megatron.slurm.local_cluster import LocalCluster, slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory):
    plugins = request.config.pluginmanager
    reporter, capman = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")

    def log(msg: str) -> None:  # on the terminal even while pytest captures output
        if reporter is None or capman is None:
            print(f"[local-slurm] {msg}", file=sys.stderr)
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(f"[local-slurm] {msg}")

    if not slurm_installed() and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    if not slurm_installed():
        log("Slurm is not installed: the slurm tests install slurm-wlm and munge with apt-get now")
    cluster = LocalCluster(prefix=tmp_path_factory.mktemp("slurm"), nodes=2, fake_gpus=2, log=log)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """SLURM_CONF for sbatch/scontrol called by the code under test (and the jobs it submits)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster
