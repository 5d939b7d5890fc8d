"""A real Ray head on loopback for the tests, started with `ray start --head --block`.

Token authentication is on (``RAY_AUTH_MODE=token`` with a random token), every port is chosen
free, the temp dir is private and short, and the head is stopped by its process group (never
`ray stop`, which would end every Ray process on the machine).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.services.ports import free_block


@dataclass
class RayHead:
    num_cpus: int = 4
    env_extra: dict[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: "ray-" + secrets.token_hex(16))
    proc: subprocess.Popen | None = None
    port: int = 0
    dashboard_port: int = 0
    temp_dir: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a driver or `ray job submit` needs to reach this cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self, timeout: float = 90.0) -> "RayHead":
        b = free_block(12)
        self.port, self.dashboard_port = b, b + 1
        # Short path: Ray's unix sockets must fit in 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="gsray", dir="/tmp")
        ray_bin = str(Path(sys.executable).parent / "ray")
        args = [
            ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={b}", f"--dashboard-port={b + 1}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={b + 2}", f"--object-manager-port={b + 3}",
            f"--node-manager-port={b + 4}", f"--dashboard-agent-listen-port={b + 5}",
            f"--dashboard-agent-grpc-port={b + 6}", f"--runtime-env-agent-port={b + 7}",
            f"--metrics-export-port={b + 8}", f"--min-worker-port={b + 100}",
            f"--max-worker-port={b + 400}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        # no drain for Ray Serve on SIGTERM (as in the image and the Slurm script): stop() is prompt
        env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ, **self.env_extra,
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        # Workers import this checkout's package, whatever is installed in the venv.
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
        self._log = open(Path(self.temp_dir) / "head.log", "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                log = (Path(self.temp_dir) / "head.log").read_text()[-3000:]
                raise RuntimeError(f"ray start exited ({self.proc.returncode}):\n{log}")
            try:
                req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                             headers={"Authorization": f"Bearer {self.token}"})
                urllib.request.urlopen(req, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Ray head not ready after {timeout}s (logs in {self.temp_dir})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)  # a test head holds nothing worth a longer drain
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self.proc = None
