#!/usr/bin/env bash
# Installs what qsnap needs on a Debian 12 machine, idempotently:
#   Debian packages (only the missing ones), and a virtualenv in .venv with
#   qsnap installed in editable mode (reinstalled when pyproject.toml changes).
# Usage: hack/install.sh [--test]     (--test adds the test dependencies)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

# What the driver runs: qemu-img/qemu-io (qemu-utils), qemu-storage-daemon
# (qemu-system-common), FUSE, filesystems, losetup; python3-venv/-dev and the
# libvirt headers build libvirt-python.
apt_packages=(qemu-utils qemu-system-common fuse3 e2fsprogs xfsprogs util-linux
              python3-venv python3-dev libvirt-dev pkg-config gcc)
# Where the kernel has nbd, volumes are served over NBD (nbd-client attaches
# the device) instead of FUSE + loop.
if [[ -d /sys/module/nbd ]] || modinfo nbd >/dev/null 2>&1; then
  apt_packages+=(nbd-client)
fi
# What the tests add: a libvirtd and a TCG guest (kernel, busybox, qemu-ga).
if [[ -n "$extras" ]]; then
  apt_packages+=(qemu-system-x86 qemu-guest-agent busybox-static linux-image-amd64 cpio
                 libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
fi

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "qsnap: installing Debian packages: ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python="${PYTHON:-python3}"
venv="$repo/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "qsnap: creating virtualenv $venv" >&2
  "$python" -m venv "$venv"
fi

# Reinstall only when the project's dependencies (or the extras) changed.
stamp="$venv/.qsnap-installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)$extras"
if [[ ! -f "$stamp" ]] || ! grep -qxF -- "$want" "$stamp"; then
  echo "qsnap: installing Python dependencies into $venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e "$repo$extras"
  echo "$want" > "$stamp"
fi
