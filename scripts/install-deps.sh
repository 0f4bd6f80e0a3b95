#!/usr/bin/env bash
# Installs the Debian packages pgherd builds and tests with (idempotent; run as root).
# protobuf-compiler + libprotobuf-dev: etcd-client's build script needs protoc and the
# google/protobuf/*.proto includes. The rest are the real systems the tests drive (systemd and
# dbus: PID 1 of the `lab up --systemd` hosts that tests/deploy_systemd.rs deploys on).
set -euo pipefail
pkgs=(protobuf-compiler libprotobuf-dev postgresql-15 postgresql-client-15 etcd-server etcd-client
      haproxy openssh-server openssh-client iptables tini iproute2 python3-venv python3-pip
      procps psmisc curl ca-certificates sudo systemd dbus)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
fi
# Debian enables (and where systemd runs, starts) these services on install; the tests run their
# own, and the systemd lab hosts boot from this machine's /etc, so they must stay disabled.
# `disable` works without a running systemd (it only edits symlinks); `disable --now` would not.
for s in postgresql etcd haproxy ssh; do
  if command -v systemctl >/dev/null; then
    systemctl disable "$s" >/dev/null 2>&1 || true
    systemctl stop "$s" >/dev/null 2>&1 || true
  fi
done
pkill -x etcd 2>/dev/null || true
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
