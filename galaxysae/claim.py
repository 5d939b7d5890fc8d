"""A claim on an output: one run at a time may write it (local folders and s3:// prefixes alike).

``{output}/_claim.json`` holds who writes the output (run id, host, pid, Slurm job, start time)
and a heartbeat time that a background thread refreshes. It is created with an atomic
create-if-absent (``O_EXCL`` locally, a conditional ``PUT`` with ``If-None-Match: *`` on S3), so of
two runs started at once exactly one gets it; the other raises :class:`ClaimError` naming the
output and the holder. A claim is taken over when its heartbeat is older than ``stale_s``, when
its pid is dead on this very host, or when it belongs to an earlier run of the same Slurm job (a
requeue). A claim held on another host (whose pid cannot be checked: a KubeRay retry on a new
pod, a new container) is watched: if its heartbeat moves, its holder is alive and this run
stops; if not, this run waits for it to go stale and takes over. So a crashed or preempted run
never blocks its rerun for longer than ``stale_s``, and its rerun does not fail meanwhile.

Some S3 servers ignore conditional writes; reading the claim back after creating it, and again on
every heartbeat, still tells a loser it lost (``lost`` turns true and the run stops before its
next commit).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid

from galaxysae import storage

log = logging.getLogger(__name__)

__all__ = ["Claim", "ClaimError", "sigterm_unwinds"]

NAME = "_claim.json"


@contextlib.contextmanager
def sigterm_unwinds():
    """Inside the block SIGTERM (scancel, a Slurm time limit, a pod eviction) raises SystemExit
    like an exception, so ``finally`` blocks run (a claim is released and the rerun starts at
    once) instead of the process dying where it stands. Only the main thread can set it."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise SystemExit(128 + signum)
        previous = signal.signal(signal.SIGTERM, _term)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class ClaimError(RuntimeError):
    """Another run holds the output."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claim:
    """``with Claim(output, stale_s):`` holds ``{output}/_claim.json`` for the block."""

    def __init__(self, output: str, stale_s: float = 600.0, heartbeat_s: float | None = None,
                 job: str = "embed"):
        self.output = output
        self.url = storage.join(output, NAME)
        self.stale_s = float(stale_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.5, min(30.0, stale_s / 4))
        now = time.time()
        self.record = {
            "run_id": uuid.uuid4().hex, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "started": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": now, "heartbeat_s": self.heartbeat_s,
        }
        self.lost = ""  # why the claim was lost, "" while it is held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- create-if-absent
    def _create(self, data: bytes) -> bool:
        if storage.is_remote(self.url):
            fs, path = storage.fsspec_fs(self.url)
            bucket, _, key = path.partition("/")
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except Exception as exc:  # noqa: BLE001 - botocore wraps the 412 in several ways
                text = f"{type(exc).__name__} {exc}"
                # s3fs turns the 412 into OSError(EINVAL, "...pre-conditions you specified did not hold")
                if any(m in text for m in ("412", "PreconditionFailed", "pre-conditions",
                                           "ConditionalRequestConflict")):
                    return False
                raise
            fs.invalidate_cache()
            return True
        path = storage.local_path(self.url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _read(self) -> dict | None:
        try:
            if storage.is_remote(self.url):
                storage.fsspec_fs(self.url)[0].invalidate_cache()
            return json.loads(storage.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written by a crashed writer, or not ours: treated as stale below

    def _encode(self) -> bytes:
        return json.dumps(self.record, sort_keys=True).encode()

    def _why_stale(self, other: dict) -> str:
        """"" when ``other`` is a live claim, else why it may be taken over."""
        if not other:
            return "unreadable claim"
        age = time.time() - float(other.get("heartbeat", 0))
        if age > self.stale_s:
            return f"heartbeat {age:.0f} s old (stale after {self.stale_s:g} s)"
        if other.get("host") == self.record["host"] and not _pid_alive(int(other.get("pid", 0))):
            return f"pid {other.get('pid')} on this host is gone"
        if self.record["slurm_job"] and other.get("slurm_job") == self.record["slurm_job"]:
            return f"an earlier run of Slurm job {other['slurm_job']} (requeued)"
        return ""

    def _describe(self, other: dict) -> str:
        age = time.time() - float(other.get("heartbeat", 0))
        slurm = f", Slurm job {other['slurm_job']}" if other.get("slurm_job") else ""
        return (f"run {other.get('run_id', '?')} on host {other.get('host', '?')} pid "
                f"{other.get('pid', '?')}{slurm}, started {other.get('started', '?')}, last "
                f"heartbeat {age:.0f} s ago")

    def acquire(self) -> "Claim":
        for _ in range(5):
            if self._create(self._encode()):
                time.sleep(0.05)  # a server that ignores If-None-Match: the last writer wins
                back = self._read()
                if back and back.get("run_id") == self.record["run_id"]:
                    self._start_heartbeat()
                    log.info("claimed %s (run %s)", self.output, self.record["run_id"])
                    return self
                if back:
                    raise ClaimError(self._busy(back))
                continue
            other = self._read()
            if other is None:
                continue  # released between our create and our read: try again
            why = self._why_stale(other)
            if not why and other.get("host") != self.record["host"]:
                why = self._watch(other)
                if why is None:
                    continue  # released while we watched: try again
            if not why:
                raise ClaimError(self._busy(other))
            log.warning("taking over the claim on %s from %s: %s", self.output,
                        self._describe(other), why)
            storage.remove(self.url)
        raise ClaimError(f"output {self.output}: could not claim {self.url} after 5 tries "
                         "(other runs keep taking it)")

    def _watch(self, other: dict) -> str | None:
        """Watch a claim held on another host: "" once its heartbeat moves (a live holder), why
        it may be taken over once it goes stale, None if it is released meanwhile."""
        beat = float(other.get("heartbeat_s") or self.heartbeat_s)
        age = time.time() - float(other.get("heartbeat", 0))
        log.warning("output %s is claimed by %s: waiting up to %.0f s for its heartbeat (every "
                    "%g s) to show the run is alive, or for the claim to go stale", self.output,
                    self._describe(other), max(0.0, self.stale_s - age) + beat, beat)
        while True:
            time.sleep(min(beat / 2, 5.0))
            now = self._read()
            if now is None:
                return None
            if not now:
                return "unreadable claim"
            if now.get("run_id") != other.get("run_id") or now.get("heartbeat") != other.get("heartbeat"):
                return ""
            why = self._why_stale(now)
            if why:
                return why

    def _busy(self, other: dict) -> str:
        return (f"output {self.output} is being written by another run ({self._describe(other)}); "
                f"not starting a second writer. Wait for it, or remove {self.url} if that run is "
                f"dead (a claim is taken over automatically once its heartbeat is "
                f"{self.stale_s:g} s old)")

    # -- heartbeat
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="galaxysae-claim", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.check()
                if self.lost:
                    return
                self.record["heartbeat"] = time.time()
                storage.write_bytes(self.url, self._encode())
            except Exception as exc:  # noqa: BLE001 - a blip of the store must not kill the run
                log.warning("claim heartbeat on %s failed: %s", self.url, type(exc).__name__)

    def check(self) -> str:
        """Re-read the claim; sets and returns ``lost`` when another run holds it now."""
        if not self.lost:
            other = self._read()
            if other is None:
                self.lost = f"claim {self.url} was removed by someone else"
            elif other and other.get("run_id") != self.record["run_id"]:
                self.lost = f"claim {self.url} was taken over by {self._describe(other)}"
        return self.lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            try:
                other = self._read()
                if other is not None and other.get("run_id") == self.record["run_id"]:
                    storage.remove(self.url)
            except Exception as exc:  # noqa: BLE001 - a leftover claim goes stale on its own
                log.warning("could not remove claim %s: %s", self.url, type(exc).__name__)

    def __enter__(self) -> "Claim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
