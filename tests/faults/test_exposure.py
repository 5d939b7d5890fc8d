"""Exposure: what our Ray clusters listen on, token auth, and the image's user.

Measured on Ray 2.60 (the test cluster, started like the Slurm scripts start theirs):
- dashboard (HTTP, job submission): 127.0.0.1 only (``--dashboard-host=127.0.0.1``);
- Ray client server: loopback and the node address, never the wildcard;
- GCS, raylet, object manager and worker gRPC ports: ALL interfaces. Ray 2.60 has no setting to
  narrow them (``--node-ip-address`` only picks the advertised address; upstream Ray changed the
  binding to the node IP after this release). So every cluster we start turns token auth on
  (``RAY_AUTH_MODE=token``, a fresh random ``RAY_AUTH_TOKEN`` per cluster, never printed): a
  process without the token is refused, by the dashboard and by the gRPC servers alike.
"""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _listening(port: int) -> set[str]:
    """Addresses bound to TCP ``port`` in LISTEN state, from /proc/net/tcp{,6}."""
    out: set[str] = set()
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, state = parts[1], parts[3]
            ip_hex, port_hex = addr.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(ip_hex)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                ip = socket.inet_ntop(socket.AF_INET6, raw)
                if ip.startswith("::ffff:"):
                    ip = ip[len("::ffff:"):]
            else:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            out.add(ip)
    return out


WILDCARD = {"0.0.0.0", "::"}


def test_test_cluster_binds_dashboard_to_loopback_and_requires_the_token(ray_cluster, ledger):
    dash = _listening(ray_cluster.dashboard_port)
    assert dash == {"127.0.0.1"}, dash
    client = _listening(ray_cluster.port + 2)
    assert client and not client & WILDCARD, client
    gcs = _listening(ray_cluster.port)
    assert gcs, "GCS not listening?"  # documented: all interfaces on Ray 2.60, token-protected
    url = f"{ray_cluster.dashboard_url}/api/version"
    ledger.fault("unauthenticated dashboard request")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code in (401, 403)
    bad = urllib.request.Request(url, headers={"Authorization": "Bearer not-the-token"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code in (401, 403)
    good = urllib.request.Request(url, headers={"Authorization": f"Bearer {ray_cluster.token}"})
    assert urllib.request.urlopen(good, timeout=10).status == 200


def test_slurm_scripts_bind_to_the_node_and_turn_token_auth_on():
    text = (REPO / "slurm" / "ray_cluster.sh").read_text()
    starts = re.findall(r'"\$_GS_RAY" start [^&]*', text)
    head = [s for s in starts if "--head" in s]
    assert head, "no `ray start --head` in slurm/ray_cluster.sh"
    assert "--dashboard-host=127.0.0.1" in head[0] and '--node-ip-address="$_GS_IP"' in head[0]
    code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    assert "0.0.0.0" not in code
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN" in text
    # the token is generated per job and never echoed into the job log
    assert not re.search(r"(echo|printf|_gs_log)[^\n]*RAY_AUTH_TOKEN", text)


def test_test_services_bind_to_loopback_with_token_auth():
    text = (REPO / "tests" / "services" / "ray_head.py").read_text()
    assert "--node-ip-address=127.0.0.1" in text and "--dashboard-host=127.0.0.1" in text
    assert '"RAY_AUTH_MODE": "token"' in text
    s3 = (REPO / "tests" / "services" / "s3.py").read_text()
    assert "-ip.bind=127.0.0.1" in s3


def test_docker_image_runs_as_a_non_root_user():
    lines = [l.strip() for l in (REPO / "Dockerfile").read_text().splitlines()]
    users = [l.split(None, 1)[1].strip() for l in lines if l.upper().startswith("USER ")]
    assert users, "Dockerfile never sets USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]}"
    # the last USER comes after the last RUN that could need root
    last_user = max(i for i, l in enumerate(lines) if l.upper().startswith("USER "))
    cmd = [i for i, l in enumerate(lines) if l.upper().startswith(("CMD", "ENTRYPOINT"))]
    assert not cmd or last_user < min(cmd)
