#!/usr/bin/env bash
# Debian packages that the test suite drives for real: headless Chromium (the atlas), and a
# single-node Slurm cluster (slurmctld, slurmd, the client tools, munge). Idempotent: installs
# only what is missing. Needs root (CI and the dev containers run as root).
set -euo pipefail

want=(chromium slurmctld slurmd slurm-client munge)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${missing[*]}; install them as root: apt-get install -y ${missing[*]}" >&2
  echo "system-deps: tests that need them will be skipped with that reason" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
