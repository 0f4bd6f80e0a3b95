#!/usr/bin/env bash
# The whole test suite: installs what a fresh Debian machine lacks, builds, runs every test
# (unit, simulation, and the integration suites against real etcd / PostgreSQL 15 / sshd /
# HAProxy). Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PGHERD_PATRONICTL=$(./scripts/patronictl-venv.sh)
cargo build --bins
# Integration tests start real services; run test binaries one at a time to keep ports and the
# two cores free for the cluster under test.
cargo test --no-fail-fast -- --test-threads=2
