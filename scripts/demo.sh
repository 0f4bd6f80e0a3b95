#!/usr/bin/env bash
# pgherd demo on one fresh Debian 12 machine, as root: a 3-host lab (network namespaces, no
# VMs), then a full deploy (etcd ×3, PostgreSQL 15 + pgherd-agent ×3, HAProxy ×3) and the
# cluster status. Lab hosts have no systemd, so services run in pgherd's supervisor mode
# (see src/provision/services.rs). Tear down with: target/release/pgherd lab down --purge
#
# It deploys the release build, which is what a real cluster runs: the debug agent is
# unoptimised and about 200 MB, which every first apply uploads to each host and every apply
# checksums. The release profile (fat LTO, one codegen unit, see Cargo.toml) takes longer to
# build; the test suite keeps using the debug binaries (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (the lab uses network namespaces)" >&2; exit 1; }
./scripts/install-deps.sh
cargo build --release --bins
pgherd=target/release/pgherd
# Named explicitly (pgherd would also find it next to itself) so the demo says what it ships.
agent=target/release/pgherd-agent
lab_dir=/tmp/pgherd-lab-pg
$pgherd lab up --hosts 3 --lab-dir "$lab_dir"
# inventories/lab.yml describes exactly this lab (hosts pg1..pg3 on 10.230.0.0/24, the lab's key).
inv=inventories/lab.yml
time $pgherd apply -i "$inv" --agent-binary "$agent" --yes
$pgherd status -i "$inv"
echo
echo "re-running apply (should change nothing):"
time $pgherd apply -i "$inv" --agent-binary "$agent" --yes
