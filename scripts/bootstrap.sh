#!/usr/bin/env bash
# Installs everything snapferry needs on a fresh Debian 12 machine (root), idempotently:
# Debian packages, the project venv with its pip dependencies, and a running libvirtd.
# Why one script: `make run` and `make test` must each work from a clean checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils
              libvirt-clients  # virsh, which the documentation's examples use
              libvirt-dev pkg-config gcc make e2fsprogs
              openssl          # the TLS tests make their certificates with it
              # tests/integration/test_real_guest.py boots a real Linux guest: this kernel
              # directly, with an initramfs of busybox and the kernel's virtio modules
              linux-image-cloud-amd64 busybox-static
              qemu-guest-agent # ... and, for the quiesce tests, the guest agent in it
              # tests/integration/bootable_guest.py: a disk that boots through SeaBIOS,
              # SYSLINUX's MBR and its FAT loader (written with mtools, no mount)
              syslinux dosfstools mtools fdisk
              prometheus       # promtool checks deploy/prometheus (config, alert rules)
              # tests/govmomi_sim: govmomi's vCenter simulator (Go library) behind our main
              golang-go golang-github-vmware-govmomi-dev
              restic           # bench/repository_bench.py measures a backup against it
              # snapshot serve/files/restore-file: a backup as an NBD disk (nbdkit and its
              # Python plugin), its files read with libguestfs (guestfish; cryptsetup-bin
              # comes with it, and the tests make an encrypted disk with it)
              nbdkit nbdkit-plugin-python libguestfs-tools cryptsetup-bin
              libguestfs-xfs   # XFS in libguestfs's appliance (the tests restore from XFS on LVM)
              chromium chromium-driver)  # the Web UI test drives a real browser
PY=${PYTHON:-python3}
# A Debian python3 needs python3-venv (and headers to build libvirt-python).
"$PY" -c "import ensurepip, venv" 2>/dev/null || APT_PACKAGES+=(python3-venv python3-dev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  # Packages with a daemon (prometheus) must not start it: only their tools are wanted.
  # Without systemd, invoke-rc.d asks policy-rc.d; 101 means "do not start".
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.snapferry-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[dev]' 2> >(grep -v 'is ignored: it is neither' >&2)
  touch "$stamp"
fi

# govmomi's vCenter simulator behind tests/govmomi_sim/main.go, built offline once (~30 s).
.venv/bin/python -c "from tests.govmomi_sim.control import build; build()"

scripts/libvirtd.sh start
