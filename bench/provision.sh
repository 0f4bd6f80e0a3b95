#!/bin/sh
# Provisioning benchmark (not a test): brings up a fresh 3-host namespace lab, times the first
# `pgherd apply` (Debian packages already present, as on the lab's shared /usr) and a no-op
# re-run, and prints a markdown table. Targets: first apply <= 30 s, no-op re-run <= 3 s.
#
# Run (as root, from the repository): ./bench/provision.sh
#   env: BENCH_SUBNET (default 10.233.4), BENCH_BRIDGE (phpol0), BENCH_REPS no-op runs (3),
#        PGHERD_KEEP_LAB=1 leaves the lab up afterwards.
# The debug build is what is uploaded (~180 MB agent binary), i.e. the slow case.
set -eu
cd "$(dirname "$0")/.."
SUBNET=${BENCH_SUBNET:-10.233.4}
BRIDGE=${BENCH_BRIDGE:-phpol0}
REPS=${BENCH_REPS:-3}
DIR=$(mktemp -d /tmp/pgbench-prov.XXXXXX)
P=target/debug/pgherd
LAB="--name pbn --subnet $SUBNET --bridge $BRIDGE --lab-dir $DIR/lab"
INV=$DIR/lab/inventory.yml
cleanup() {
    if [ -z "${PGHERD_KEEP_LAB:-}" ]; then
        $P lab down $LAB >/dev/null 2>&1 || true
        rm -rf "$DIR"
    else
        echo "lab kept: $P lab down $LAB" >&2
    fi
}
trap cleanup EXIT INT TERM

cargo build --quiet --bins
$P lab down $LAB >/dev/null 2>&1 || true
$P lab up $LAB --hosts 3 >/dev/null
printf 'profile: fast\nwatchdog:\n  mode: "off"\n' >> "$INV"

now() { date +%s.%N; }
secs() { echo "$1 $2" | awk '{printf "%.1f", $2 - $1}'; }

t0=$(now)
$P --state-dir "$DIR/st" apply -y -i "$INV" --no-diff > "$DIR/first.log" 2>&1 \
    || { cat "$DIR/first.log"; exit 1; }
first=$(secs "$t0" "$(now)")
changes=$(grep -o 'applied [0-9]* change' "$DIR/first.log" | grep -o '[0-9]*')

noops=""
for i in $(seq "$REPS"); do
    t0=$(now)
    $P --state-dir "$DIR/st" apply -y -i "$INV" --timings > "$DIR/noop$i.log" 2>&1 \
        || { cat "$DIR/noop$i.log"; exit 1; }
    grep -q 'nothing to do' "$DIR/noop$i.log" || { echo "re-run $i changed something:"; cat "$DIR/noop$i.log"; exit 1; }
    noops="$noops $(secs "$t0" "$(now)")"
done
best=$(echo $noops | tr ' ' '\n' | sort -n | head -1)
worst=$(echo $noops | tr ' ' '\n' | sort -n | tail -1)

echo
echo "| step (3-host lab, debug agent binary $(du -m target/debug/pgherd-agent | cut -f1) MB) | wall time | target |"
echo "|---|---|---|"
echo "| first \`pgherd apply\` ($changes changes) | ${first} s | <= 30 s |"
echo "| no-op re-run (best / worst of $REPS) | ${best} s / ${worst} s | <= 3 s |"
echo
echo "stages of the last no-op run (--timings):"
grep '^timing:' "$DIR/noop$REPS.log"
