#!/usr/bin/env bash
# Creates (once) a venv with the unmodified patronictl 4.1.5 from PyPI, used by the
# compatibility tests. Prints the path of the patronictl executable.
set -euo pipefail
venv=${PGHERD_PATRONI_VENV:-/var/tmp/pgherd-patroni-venv}
if [ ! -x "$venv/bin/patronictl" ]; then
  /usr/bin/python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q 'patroni[etcd3]==4.1.5' psycopg2-binary >&2
fi
echo "$venv/bin/patronictl"
