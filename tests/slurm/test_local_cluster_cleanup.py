"""The Slurm test harness itself (issue 12, item 16): /etc/hosts is replaced whole, and a run killed
without stop() (SIGKILL of pytest) leaves nothing that breaks the next start."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minpro_megatron.slurm import local_cluster
from minpro_megatron.slurm.local_cluster import HOSTS_FILE, HOSTS_TAG, LocalCluster, _pid_alive, write_hosts


def test_write_hosts_renames_or_rewrites_whole(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    hosts.chmod(0o644)
    assert write_hosts("127.0.0.1 localhost\n127.0.0.1 node1 # tag\n", hosts) == "rename"
    assert hosts.read_text() == "127.0.0.1 localhost\n127.0.0.1 node1 # tag\n"
    assert hosts.stat().st_mode & 0o777 == 0o644 and sorted(os.listdir(tmp_path)) == ["hosts"]
    # a bind-mounted /etc/hosts (containers) cannot be renamed over: one full write in place, same inode
    inode = hosts.stat().st_ino

    def busy(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy", str(dst))

    monkeypatch.setattr(local_cluster.os, "replace", busy)
    assert write_hosts("127.0.0.1 localhost\n", hosts) == "in-place"
    assert hosts.read_text() == "127.0.0.1 localhost\n" and hosts.stat().st_ino == inode
    assert sorted(os.listdir(tmp_path)) == ["hosts"]  # no temporary file left behind


def _tagged() -> list[str]:
    return sorted(line.split()[1] for line in HOSTS_FILE.read_text().splitlines() if line.rstrip().endswith(HOSTS_TAG))


KILLED_RUN = """
import os, signal, sys, time
from minpro_megatron.slurm.local_cluster import LocalCluster
c = LocalCluster(sys.argv[1], nodes=3)
c.start()
job = c.sbatch(["-o", "/dev/null", "--wrap", f"echo $$ > {sys.argv[1]}/job.pid; exec sleep 300"])
deadline = time.monotonic() + 60
while not os.path.exists(f"{sys.argv[1]}/job.pid") and time.monotonic() < deadline:
    time.sleep(0.1)
time.sleep(0.5)
print("up", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # like pytest killed mid-session: no stop(), no cleanup
"""


@pytest.mark.slurm
def test_start_cleans_up_after_a_killed_run(slurm_cluster, tmp_path):
    slurm_cluster.stop()  # the session's cluster makes room (the harness allows one per machine)
    killed = tmp_path / "killed"
    killed.mkdir()
    try:
        proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(killed)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL and "up" in proc.stdout, proc.stderr[-3000:]
        leftovers = [int(p.read_text()) for p in (killed / "run").glob("*.pid")]
        job_pid = int((killed / "job.pid").read_text())
        assert len(leftovers) >= 4 and all(_pid_alive(p) for p in leftovers + [job_pid])  # ctld, 3 slurmd, job
        assert _tagged() == ["node1", "node2", "node3"]
        slurm_cluster.start()  # 2 nodes, another prefix, same ports: must clean up and come up
        assert not any(_pid_alive(p) for p in leftovers + [job_pid])
        assert _tagged() == ["node1", "node2"]  # node3 of the killed run is gone
        assert slurm_cluster.idle_nodes() == 2
        job = slurm_cluster.sbatch(["-o", "/dev/null", "--wrap", "true"])
        assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED"
    finally:  # whatever happened, leave the session's cluster up and nothing of the killed run
        if not _pid_alive(int((slurm_cluster.run_dir / "slurmctld.pid").read_text() or 0)
                          if (slurm_cluster.run_dir / "slurmctld.pid").exists() else 0):
            LocalCluster(killed, nodes=3).stop(quiet=True)
            for pid_file in [killed / "job.pid"]:
                if pid_file.exists() and _pid_alive(int(pid_file.read_text())):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
            slurm_cluster.start()
