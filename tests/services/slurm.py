"""A real single-node Slurm cluster on this machine for the tests: munged, slurmctld, slurmd.

Everything lives in a private temp dir (generated munge key, slurm.conf, gres.conf, state and
spool dirs, pid and log files) and every port is chosen free, so several suites can run side by
side. There is no systemd here: the daemons are started by hand in the foreground, each in its
own process group, and stopped by PID. The node has one fake GPU (``File=/dev/null``) so that
``--gres=gpu:1`` scripts are accepted. Clients find the cluster through ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.services.ports import free_block

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
INSTALL = "apt-get install -y --no-install-recommends " + " ".join(PACKAGES)


def missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if not found:
        raise RuntimeError(f"{name} not found; install the Slurm packages: {INSTALL}")
    return found


def node_resources() -> tuple[int, str]:
    """(CPUs, the hardware part of a NodeName line) of this machine, as `slurmd -C` reports it."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = out.splitlines()[0]
    cpus = int(re.search(r"\bCPUs=(\d+)", line).group(1))
    hw = " ".join(w for w in line.split() if not w.startswith("NodeName="))
    return cpus, hw


@dataclass
class SlurmCluster:
    root: Path | None = None
    partition: str = "gstest"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    conf: Path | None = None
    node: str = ""
    cpus: int = 0
    ctld_port: int = 0

    # ------------------------------------------------------------------ setup

    def env(self) -> dict[str, str]:
        """What sbatch/squeue/scontrol/scancel need to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_files(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self.cpus, hardware = node_resources()
        self.node = socket.gethostname().split(".")[0]
        b = free_block(2)
        self.ctld_port = b
        sock = root / "run" / "munge.sock"
        (root / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File=/dev/null Count=1\n")
        (root / "plugstack.conf").write_text("")
        self.conf = root / "slurm.conf"
        self.conf.write_text("\n".join([
            "ClusterName=gstest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={b}",
            f"SlurmdPort={b + 1}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s): keep tests quick.
            f"AuthInfo=socket={sock},cred_expire=10",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={root / 'plugstack.conf'}",
            # No cgroups in this container: track processes by parentage, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            # A requeued job becomes eligible after cred_expire; the scheduling loops (default every
            # 60 s, backfill 30 s) then start it: poll often so the requeue test does not idle.
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "GresTypes=gpu",
            # Job ids seed Ray temp dirs and port blocks: keep them apart from other test clusters.
            f"FirstJobId={random.randrange(1000, 900000)}",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "MinJobAge=600",
            "KillWait=10",
            "Waittime=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} {hardware} "
            "Gres=gpu:1 State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=NO",
            "",
        ]))

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        if self.root is None:
            # Short path: the munge socket path must fit in a unix socket name.
            self.root = Path(tempfile.mkdtemp(prefix="gsslurm", dir="/tmp"))
            self.root.chmod(0o755)  # munged wants its socket's directories traversable
        self._write_files()
        root = self.root
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # munged refuses to run as root unless forced; here root is the only user.
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--key-file={root / 'munge.key'}",
            f"--socket={root / 'run' / 'munge.sock'}", f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'run' / 'munge.seed'}",
        ], env)
        self._wait_for(lambda: (root / "run" / "munge.sock").exists(), timeout, "munged")
        # -i: ignore saved state (a fresh cluster each session); -D: stay in the foreground.
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        self._wait_for(self._ctld_up, timeout, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], env)
        self._wait_for(self._node_idle, timeout, "slurmd")
        return self

    def _spawn(self, name: str, args: list[str], env: dict) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _wait_for(self, ready, timeout: float, name: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for n, p in self.procs.items():
                if p.poll() is not None:
                    tail = self.logs()
                    self.stop()
                    raise RuntimeError(f"{n} exited with {p.returncode} while starting {name}:\n{tail}")
            if ready():
                return
            time.sleep(0.5)
        tail = self.logs()
        self.stop()
        raise RuntimeError(f"{name} not ready after {timeout}s:\n{tail}")

    def _ctld_up(self) -> bool:
        return self.scontrol("ping", check=False).returncode == 0

    def _node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.strip()
        return out.startswith("idle")

    # ------------------------------------------------------------------ clients

    def run(self, args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = {**os.environ, **kw.pop("env", {}), "SLURM_CONF": str(self.conf)}
        return subprocess.run(args, env=env, capture_output=True, text=True, check=check, **kw)

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args], check=check)

    def job_state(self, job_id: str) -> str:
        out = self.scontrol("show", "job", job_id, check=False).stdout
        m = re.search(r"\bJobState=(\S+)", out)
        return m.group(1) if m else "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str:
        out = self.scontrol("show", "job", job_id, check=False).stdout
        m = re.search(rf"\b{name}=(\S*)", out)
        return m.group(1) if m else ""

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {state} after {timeout}s (wanted {sorted(states)})")

    def logs(self, n: int = 2000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")) if self.root else []:
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ teardown

    def stop(self, keep: bool = False) -> None:
        """Cancel what is still queued, stop the daemons by PID, remove the temp dir."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", f"--partition={self.partition}"], check=False)
            deadline = time.time() + 45
            while time.time() < deadline:
                if not self.run(["squeue", "-h"], check=False).stdout.strip():
                    break
                time.sleep(1)
        # Reverse start order: the node daemon first, munge last.
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
            except ProcessLookupError:
                pass
        if self.root and not keep:
            shutil.rmtree(self.root, ignore_errors=True)
