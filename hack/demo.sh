#!/usr/bin/env bash
# Quick start: installs what qsnap needs (idempotently), runs the driver on
# the default pool (/var/lib/qsnap as root, or $QSNAP_POOL), and shows a
# snapshot round trip: create a volume, write data into it, snapshot,
# overwrite, restore, and check that the data came back.
# The driver keeps running afterwards until Ctrl-C (QSNAP_DEMO_EXIT=1: stop
# it after the demo instead).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/hack/install.sh"
qsnap="$repo/.venv/bin/qsnap"
py="$repo/.venv/bin/python"

run_dir="${QSNAP_RUN_DIR:-/run/qsnap}"
[[ -w "$(dirname "$run_dir")" ]] || run_dir="${XDG_RUNTIME_DIR:-/tmp}/qsnap"
mkdir -p "$run_dir"
export CSI_ENDPOINT="unix://$run_dir/csi.sock"
log="$run_dir/driver.log"

"$qsnap" serve --endpoint "$CSI_ENDPOINT" >"$log" 2>&1 &
driver=$!
stop_driver() { kill "$driver" 2>/dev/null && wait "$driver" 2>/dev/null || true; }
trap stop_driver EXIT INT TERM

for _ in $(seq 100); do
  "$qsnap" pool >/dev/null 2>&1 && break
  kill -0 "$driver" 2>/dev/null || { cat "$log" >&2; echo "qsnap: the driver did not start" >&2; exit 1; }
  sleep 0.1
done

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
top_layer() { "$qsnap" --json volume show "$1" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["chain"][0]["path"])'; }
field() { "$py" -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

suffix="$(date +%s)"
echo "qsnap demo: driver at $CSI_ENDPOINT, pool $("$qsnap" --json pool | field root), log $log"

vol=$("$qsnap" --json volume create "demo-$suffix" --size 1G | field id)
step "$qsnap" volume show "$vol"

echo; echo "# write 4 MiB of 0xaa into the volume (it is closed, so qemu-io may write its top layer)"
step qemu-io -f qcow2 -c "write -P 0xaa 0 4M" "$(top_layer "$vol")"

snap=$("$qsnap" --json snapshot create "demo-snap-$suffix" "$vol" | field id)
step "$qsnap" snapshot show "$snap"

echo; echo "# overwrite the volume with 0xbb"
step qemu-io -f qcow2 -c "write -P 0xbb 0 4M" "$(top_layer "$vol")"

restored=$("$qsnap" --json restore "$snap" "demo-restored-$suffix" | field id)
step "$qsnap" volume show "$restored"

echo; echo "# the restored volume holds the snapshot's data, the volume keeps its new data"
step qemu-io -f qcow2 -c "read -P 0xaa 0 4M" "$(top_layer "$restored")"
step qemu-io -f qcow2 -c "read -P 0xbb 0 4M" "$(top_layer "$vol")"
for dev in "$restored" "$vol"; do
  if qemu-io -f qcow2 -c "read -P $([[ $dev == "$restored" ]] && echo 0xaa || echo 0xbb) 0 4M" \
      "$(top_layer "$dev")" | grep -q "verification failed"; then
    echo "qsnap demo: DATA MISMATCH on $dev" >&2; exit 1
  fi
done
echo; echo "# data came back: restore OK"

step "$qsnap" snapshot list
step "$qsnap" volume list
echo; echo "# clean up: deleting in any order is safe; layers are reclaimed when nothing needs them"
step "$qsnap" volume delete "$vol"
step "$qsnap" snapshot delete "$snap"
step "$qsnap" volume delete "$restored"
sleep 0.5
step "$qsnap" pool

if [[ "${QSNAP_DEMO_EXIT:-0}" == 1 ]]; then
  exit 0
fi
echo; echo "qsnap: the driver keeps serving $CSI_ENDPOINT (log: $log); Ctrl-C stops it."
wait "$driver"
