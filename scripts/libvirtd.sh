#!/usr/bin/env bash
# Starts (or reports) a monolithic libvirtd without systemd, as Debian 12 needs it here:
# the libvirt-qemu user must exist, logs need a directory, and QEMU runs as root with
# stdio going to files so that virtlogd is not needed.
set -euo pipefail
cmd=${1:-start}
PIDFILE=/run/libvirtd.pid

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "$cmd" in
  start)
    if running; then exit 0; fi
    id libvirt-qemu >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu
    getent group kvm >/dev/null || groupadd --system kvm
    mkdir -p /var/log/libvirt/qemu /etc/libvirt /var/lib/libvirt/images /run/libvirt
    if ! grep -q '^# snapferry' /etc/libvirt/qemu.conf 2>/dev/null; then
      cat > /etc/libvirt/qemu.conf <<'CONF'
# snapferry: QEMU as root, stdio to files (no virtlogd), no namespaces (no systemd here)
user = "root"
group = "root"
dynamic_ownership = 0
stdio_handler = "file"
namespaces = []
remember_owner = 0
CONF
    fi
    if ! grep -q '^# snapferry' /etc/libvirt/libvirtd.conf 2>/dev/null; then
      cat > /etc/libvirt/libvirtd.conf <<'CONF'
# snapferry: log to a file, local UNIX socket only
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
    fi
    libvirtd -d --pid-file "$PIDFILE" 2>/dev/null || libvirtd -d
    for _ in $(seq 50); do
      [ -S /run/libvirt/libvirt-sock ] && running && exit 0
      sleep 0.1
    done
    echo "libvirtd did not start; see /var/log/libvirt/libvirtd.log" >&2
    exit 1
    ;;
  status)
    running && echo "libvirtd running (pid $(cat $PIDFILE))" || { echo "libvirtd not running"; exit 3; }
    ;;
  *) echo "usage: $0 start|status" >&2; exit 2 ;;
esac
