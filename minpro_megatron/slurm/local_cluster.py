"""A real Slurm cluster on this machine (slurmctld + one slurmd per emulated node + munge), for tests.

    with LocalCluster(prefix="/tmp/minpro-slurm", nodes=2, fake_gpus=2) as cluster:
        job = cluster.sbatch(["job.sbatch"]); cluster.wait_job(job, timeout=60)

    eval "$(python -m minpro_megatron.slurm.local_cluster start --nodes 2)"   # runs the `export SLURM_CONF=...` it prints
    python -m minpro_megatron.slurm.local_cluster status | stop

Debian's slurm-wlm packages are installed with apt-get when ``slurmctld`` is missing (root only; ~15 s,
logged loudly). There is no systemd: every daemon runs in the foreground in its own session and is
stopped by the PID recorded under ``<prefix>/run`` (also when start fails half-way). Emulated nodes are
``node1..nodeN`` with one slurmd port each, node k on its own loopback alias 127.0.0.(k+1) (all of
127.0.0.0/8 is loopback on Linux), so servers that bind "the node's address" really bind different
addresses and nothing listens beyond this host; their names go into /etc/hosts with a tag and
leave again on stop. /etc/hosts is rewritten whole (a temporary file renamed over it, or one in-place
write of the full text where it is a bind mount and rename fails).

A run killed before stop() (SIGKILL of pytest) leaves daemons, jobs and /etc/hosts lines behind; the
next start() cleans them: every process this harness starts (daemons, and through sbatch the jobs)
carries MINPRO_LOCAL_SLURM=<prefix> in its environment, and ``STATE_FILE`` names the running cluster's
prefix. Under the machine-wide lock, marked processes of another prefix are stale and are stopped,
unless that cluster was started detached by the CLI (then start() says how to stop it).

The cluster uses its own ports (16817+) and its own SLURM_CONF, so a real Slurm installation on the
same machine is left alone.

Length: the whole lifecycle of one real Slurm cluster (install, munge, config, daemons, cleanup of orphans) in one class used only by tests and the demo job.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["LocalCluster", "SlurmUnavailable", "slurm_installed", "install_slurm", "main"]

HOSTS_TAG = "# minpro-local-slurm"
HOSTS_FILE = Path("/etc/hosts")
STATE_FILE = Path(os.environ.get("MINPRO_SLURM_STATE", "/tmp/minpro-local-slurm.json"))  # the running cluster
MARK = "MINPRO_LOCAL_SLURM"  # environment mark of every process the harness starts (value: its prefix)
DEFAULT_PREFIX = os.environ.get("MINPRO_SLURM_PREFIX", "/tmp/minpro-slurm")
LOCK_FILE = "/tmp/minpro-local-slurm.lock"  # one local cluster per machine (ports, /etc/hosts)
PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (not root, or no apt-get)."""


def _log(msg: str) -> None:
    print(f"[local-slurm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slurm_installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def install_slurm(log: Callable[[str], None] = _log) -> None:
    """apt-get install slurm-wlm munge (without starting their services) and make a munge key."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and this machine has no apt-get (Debian/Ubuntu only)")
    log(f"INSTALLING Slurm: apt-get install {' '.join(PACKAGES)} (about 15 s, once per machine)")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:  # keeps the packages' maintainer scripts from starting daemons
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    log(f"installed Slurm in {time.monotonic() - t0:.1f} s")


def _ensure_munge_key() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, capture_output=True)
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie has already exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _marked(pid: int) -> str | None:
    """The MINPRO_LOCAL_SLURM prefix in a process's environment, or None (not ours, gone, or unreadable)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(MARK.encode() + b"="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


def _is_daemon(pid: int, name: str) -> bool:
    """Whether ``pid`` is still the daemon of pid file ``name`` (slurmd-node1, slurmctld, munged)."""
    if _marked(pid) is not None:
        return True
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return bool(argv0) and Path(argv0).name in name


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def write_hosts(text: str, path: Path = HOSTS_FILE) -> str:
    """Replace ``path`` with ``text`` whole: a temporary file in the same directory renamed over it, so a
    reader sees the old or the new file and a kill leaves no half-written one. Where ``path`` is a bind
    mount (containers), rename fails with EBUSY/EXDEV/EPERM: then one write of the full text in place.
    Returns "rename" or "in-place"."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    tmp = path.with_name(f".{path.name}.minpro-{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        return "rename"
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS):
            raise
    with open(path, "r+") as f:  # a bind mount: the same inode must be rewritten
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return "in-place"


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalCluster:
    """A single-host Slurm cluster with ``nodes`` emulated nodes; state, logs and pids under ``prefix``."""

    def __init__(self, prefix: str | os.PathLike = DEFAULT_PREFIX, nodes: int = 1, fake_gpus: int = 0,
                 min_job_age: int = 4, base_port: int = 16817, install: bool = True,
                 log: Callable[[str], None] = _log, detached: bool = False) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.prefix = Path(prefix).resolve()
        self.nodes = nodes
        self.fake_gpus = fake_gpus
        self.min_job_age = min_job_age
        self.base_port = base_port
        self.install = install
        self.log = log
        self.detached = detached  # started by the CLI: it outlives the process that started it
        self.conf = self.prefix / "etc" / "slurm.conf"
        self.run_dir = self.prefix / "run"
        self.log_dir = self.prefix / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock_fd: int | None = None

    # ---- public API -------------------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def node_addr(self, name: str) -> str:
        """Node k's address: the loopback alias 127.0.0.(k+1), distinct per node and reachable only here."""
        return f"127.0.0.{self.node_names.index(name) + 2}"

    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (and jobs: sbatch exports it) that targets this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf), **{MARK: str(self.prefix)})

    def start(self, lock_timeout: float = 900.0) -> None:
        """Install if needed, configure and start the daemons; on any failure stop what was started."""
        t0 = time.monotonic()
        if not slurm_installed():
            if not self.install:
                raise SlurmUnavailable("Slurm is not installed (slurmctld/slurmd/sbatch/munged missing)")
            install_slurm(self.log)
        self._acquire_lock(lock_timeout)
        try:
            self._clean_stale()  # leftovers of a killed run under another prefix
            self._stop_daemons(quiet=True)  # leftovers of a crashed run under this prefix
            STATE_FILE.write_text(json.dumps({"prefix": str(self.prefix), "pid": os.getpid(), "detached": self.detached}))
            if _port_busy(self.base_port):
                raise RuntimeError(f"port {self.base_port} is busy: another local Slurm cluster is running "
                                   f"(stop it: python -m minpro_megatron.slurm.local_cluster stop --prefix ...)")
            self._configure()
            self._start_munge()
            self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D"])
            self._wait(30, lambda: "UP" in self._client(["scontrol", "ping"]), "slurmctld to answer ping")
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", ["/usr/sbin/slurmd", "-D", "-N", name])
            self._wait(60, lambda: self.idle_nodes() == self.nodes, f"{self.nodes} idle node(s)")
        except BaseException:
            self.log("start failed: stopping what was started; daemon logs follow")
            self._dump_logs()
            self._stop_daemons(quiet=True)
            self._release_lock()
            raise
        self.log(f"cluster up in {time.monotonic() - t0:.1f} s: {self.nodes} node(s) "
                 f"{','.join(self.node_names)}, SLURM_CONF={self.conf}")

    def stop(self, quiet: bool = False) -> None:
        """Cancel jobs, stop every daemon this prefix started (by PID) and remove the /etc/hosts lines."""
        self._stop_daemons(quiet)
        state = self._state()
        if state and state.get("prefix") == str(self.prefix):
            STATE_FILE.unlink(missing_ok=True)
        self._release_lock()

    @staticmethod
    def _state() -> dict | None:
        try:
            state = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def _clean_stale(self) -> None:
        """Under the lock: stop what a killed run of another prefix left (daemons, jobs, hosts lines)."""
        state = self._state()
        old = state.get("prefix") if state else None
        if old and old != str(self.prefix):
            other = LocalCluster(old, log=self.log)
            alive = [p for p in other.run_dir.glob("*.pid") if p.read_text().strip().isdigit()
                     and _pid_alive(int(p.read_text()))]
            if state.get("detached") and alive:
                raise RuntimeError(f"a local Slurm cluster started by the CLI runs under {old}; stop it first: "
                                   f"python -m minpro_megatron.slurm.local_cluster stop --prefix {old}")
            if alive:
                self.log(f"cleaning up after a run killed without stop(): daemons under {old}")
                other._stop_daemons(quiet=True)
        # whatever still carries the mark of another prefix (pid files lost, jobs of dead daemons)
        # and their children: job steps and what the jobs started (servers holding ports)
        mine = _ancestors()
        marked = {pid for pid in (int(d) for d in os.listdir("/proc") if d.isdigit())
                  if (m := _marked(pid)) is not None and m != str(self.prefix)}
        stale = sorted((marked | _descendants(marked)) - mine)
        if stale:
            self.log(f"stopping {len(stale)} stale process(es) of a killed local cluster: {stale}")
        for pid in stale:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_pid_alive(p) for p in stale) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._remove_hosts()

    def _stop_daemons(self, quiet: bool) -> None:
        if self.conf.exists() and (self.run_dir / "slurmctld.pid").exists():
            jobs = self._client(["squeue", "-h", "-o", "%i"], check=False).split()
            if jobs:
                self._client(["scancel", *jobs], check=False)
            try:
                self._wait(15, lambda: not self._client(["squeue", "-h"], check=False).strip(), "jobs to end")
            except TimeoutError:
                pass
        for group in (sorted(self.run_dir.glob("slurmd-*.pid")), [self.run_dir / "slurmctld.pid"],
                      [self.run_dir / "munged.pid"]):
            self._stop_pids(group, quiet)
        self._remove_hosts()

    def status(self) -> dict:
        pids = {}
        for f in sorted(self.run_dir.glob("*.pid")):
            pid = int(f.read_text())
            pids[f.stem] = {"pid": pid, "alive": _pid_alive(pid)}
        info = {"prefix": str(self.prefix), "slurm_conf": str(self.conf), "daemons": pids}
        if pids.get("slurmctld", {}).get("alive"):
            info["sinfo"] = self._client(["sinfo", "-N", "-o", "%N %T %c %m %G"], check=False).strip()
            info["squeue"] = self._client(["squeue", "-o", "%i %j %T %M %R"], check=False).strip()
        return info

    def idle_nodes(self) -> int:
        out = self._client(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False)
        return len(set(out.split()))

    def sbatch(self, args: Sequence[str], cwd: str | os.PathLike | None = None) -> str:
        """Submit; returns the job id (``ID`` or ``ID;cluster`` is reduced to ``ID``)."""
        out = self._client(["sbatch", "--parsable", *args], cwd=cwd)
        return out.strip().split(";")[0]

    def job_state(self, job_id: str) -> str | None:
        """JobState from ``scontrol show job`` (kept for MinJobAge seconds after the end), None if gone."""
        out = self._client(["scontrol", "-o", "show", "job", job_id], check=False)
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    def job_info(self, job_id: str) -> dict[str, str]:
        out = self._client(["scontrol", "-o", "show", "job", job_id], check=False)
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(self, job_id: str, timeout: float = 120.0, poll: float = 0.2) -> str:
        """Wait until the job (all array tasks) leaves the queue; returns the final state seen.

        Impossible requests stay PENDING forever, hence the timeout (the error shows the reason)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            queued = self._client(["squeue", "-h", "-j", job_id, "-o", "%T %R"], check=False).strip()
            state = self.job_state(job_id)
            last = state or last
            if not queued and state not in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "REQUEUED"):
                return last or "GONE"
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still queued after {timeout:.0f} s: "
                           f"{self._client(['squeue', '-j', job_id, '-o', '%i %T %R'], check=False).strip()}")

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- internals --------------------------------------------------------------------------
    def _client(self, cmd: Sequence[str], check: bool = True, cwd: str | os.PathLike | None = None) -> str:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, cwd=cwd, timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def _acquire_lock(self, timeout: float) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + timeout
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not warned:
                    self.log(f"waiting for another local Slurm cluster on this machine ({LOCK_FILE})")
                    warned = True
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another local Slurm cluster held {LOCK_FILE} for {timeout:.0f} s")
                time.sleep(1)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _configure(self) -> None:
        for sub in ("etc", "state", "log", "run"):
            shutil.rmtree(self.prefix / sub, ignore_errors=True)
        for sub in ("etc", "state/ctld", "log", "run"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        mem_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 * 95 // 100 // self.nodes
        p, log, run = self.prefix, self.log_dir, self.run_dir
        lines = [
            "ClusterName=minpro-local",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={self.base_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "AuthInfo=cred_expire=5",  # a requeued job waits this long before it may start (default 120 s)
            "MpiDefault=none",
            "MailProg=/bin/true",  # the default mail program does not exist: slurmctld refuses to start
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2",  # no 3 s start delay; requeued jobs start soon
            "SlurmdParameters=config_overrides",  # nodes declare the host's CPUs, not their own
            "ReturnToService=2",
            f"MinJobAge={self.min_job_age}",  # sbatch --wait polls slowly while MinJobAge is large
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"StateSaveLocation={p}/state/ctld",
            f"SlurmdSpoolDir={p}/state/%n",
            f"SlurmctldPidFile={run}/slurmctld.pidfile",
            f"SlurmdPidFile={run}/slurmd-%n.pidfile",
            f"SlurmctldLogFile={log}/slurmctld.log",
            f"SlurmdLogFile={log}/slurmd-%n.log",
        ]
        if self.fake_gpus:
            # GRES files must be character devices: /dev/null's numbers, one per fake GPU
            lines.append("GresTypes=gpu")
            gres = []
            for i in range(self.fake_gpus):
                dev = p / "etc" / f"gpu{i}"
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
                gres.append(f"Name=gpu File={dev}")
            (p / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")
        for i, name in enumerate(self.node_names, start=1):
            (p / "state" / name).mkdir(parents=True, exist_ok=True)
            gres = f" Gres=gpu:{self.fake_gpus}" if self.fake_gpus else ""
            lines.append(f"NodeName={name} CPUs={cpus} RealMemory={mem_mib}{gres} NodeHostname={host} "
                         f"NodeAddr={self.node_addr(name)} Port={self.base_port + i}")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        self._add_hosts()

    def _add_hosts(self) -> None:
        self._remove_hosts()  # stale lines of a killed run (maybe with more nodes) first
        missing = []
        for name in self.node_names:
            try:
                socket.gethostbyname(name)
            except OSError:
                missing.append(name)
        if missing:
            text = HOSTS_FILE.read_text()
            if text and not text.endswith("\n"):
                text += "\n"
            how = write_hosts(text + "".join(f"{self.node_addr(name)} {name} {HOSTS_TAG}\n" for name in missing))
            self.log(f"/etc/hosts: added {', '.join(missing)} (tagged '{HOSTS_TAG}', {how})")

    def _remove_hosts(self) -> None:
        text = HOSTS_FILE.read_text()
        kept = [line for line in text.splitlines(keepends=True) if not line.rstrip().endswith(HOSTS_TAG)]
        if len(kept) != len(text.splitlines()):
            write_hosts("".join(kept))

    def _start_munge(self) -> None:
        if self._munge_ok():
            self.log("munged already running: using it (it is not stopped by this cluster)")
            return
        _ensure_munge_key()
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        # setpriv execs munged (runuser would stay as its parent), so the recorded PID is munged's
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                               "/usr/sbin/munged", "-F"])
        self._wait(10, self._munge_ok, "munged")

    @staticmethod
    def _munge_ok() -> bool:
        cred = subprocess.run(["munge", "-n"], capture_output=True)
        if cred.returncode:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.log_dir / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env(), start_new_session=True)
        out.close()
        self._procs[name] = proc
        (self.run_dir / f"{name}.pid").write_text(str(proc.pid))

    def _stop_pids(self, pid_files: list[Path], quiet: bool) -> None:
        pids = []
        for f in pid_files:
            if not f.exists():
                continue
            pid = int(f.read_text())
            f.unlink()
            if _pid_alive(pid) and _is_daemon(pid, f.stem):  # a recycled PID is someone else's process
                os.kill(pid, signal.SIGTERM)
                pids.append((f.stem, pid))
                if not quiet:
                    self.log(f"TERM {f.stem} (pid {pid})")
        for name, pid in pids:
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                if name in self._procs:
                    self._procs[name].poll()  # reap our own child so it does not linger as a zombie
                time.sleep(0.05)
            if _pid_alive(pid):
                self.log(f"{name} (pid {pid}) ignored TERM for 30 s: KILL")
                os.kill(pid, signal.SIGKILL)
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.wait(timeout=10)

    def _wait(self, timeout: float, ok: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok():
                    return
            except (RuntimeError, subprocess.SubprocessError):
                pass
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def _dump_logs(self) -> None:
        for f in sorted(self.log_dir.glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-15:]
            if tail:
                self.log(f"--- {f.name}\n" + "\n".join(tail))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.slurm.local_cluster",
                                 description="A real single-host Slurm cluster for tests (root, Debian/Ubuntu).")
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--nodes", type=int, default=1, help="emulated nodes node1..N (default 1)")
    ap.add_argument("--fake-gpus", type=int, default=0, help="GRES gpus per node backed by fake devices")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"state/log/pid directory (default {DEFAULT_PREFIX})")
    ap.add_argument("--min-job-age", type=int, default=4)
    args = ap.parse_args(argv)
    cluster = LocalCluster(args.prefix, nodes=args.nodes, fake_gpus=args.fake_gpus, min_job_age=args.min_job_age,
                           detached=args.action == "start")
    if args.action == "start":
        cluster.start()
        print(cluster.status()["sinfo"], file=sys.stderr)
        # Slurm's commands find this cluster only through SLURM_CONF: the line below is a command to run in
        # the user's shell (stdout holds only it, so `eval "$(... start)"` works too).
        print("Slurm commands reach this cluster only with its config; run this in your shell:", file=sys.stderr)
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
    elif args.action == "stop":
        cluster.stop()
    else:
        print(json.dumps(cluster.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
