#!/usr/bin/env bash
# Regenerates the figures in BENCHMARKS.md with one command: starts a qsnap
# driver on a temporary pool, runs `qsnap bench` with the documented sizes,
# writes bench-out/bench.json and bench-out/bench.html, prints the table, and
# stops the driver and removes the pool afterwards (also on Ctrl-C).
#
# Usage: hack/bench.sh [more `qsnap bench` flags, which override the defaults]
# Environment:
#   BENCH_SIZES      volume sizes, filled and empty (default 1G,64G); sizes the
#                    pool's filesystem cannot hold filled are dropped, with a note
#   BENCH_DIR        where the temporary pool goes (default /var/tmp); it needs
#                    the largest size free, plus a few GiB
#   BASELINE_ENDPOINT  a second CSI driver to compare with (--baseline)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/hack/install.sh"
py="$repo/.venv/bin/python"
out="$repo/bench-out"
mkdir -p "$out"

work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/qsnap-bench.XXXXXX")"
sock="$work/csi.sock"
driver_pid=""
finish() {
  if [[ -n "$driver_pid" ]]; then
    kill -TERM "$driver_pid" 2>/dev/null || true
    wait "$driver_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap finish EXIT

# Filling a volume needs its size on disk: keep the sizes that fit, with 4 GiB
# to spare for the driver's own files and the rest of the machine.
sizes="$("$py" - "${BENCH_SIZES:-1G,64G}" "$work" <<'EOF'
import os, sys
from csidriver.units import format_size, parse_size
wanted, path = sys.argv[1].split(","), sys.argv[2]
st = os.statvfs(path)
room = st.f_bavail * st.f_frsize - (4 << 30)
keep = [s for s in wanted if parse_size(s) <= room]
for s in wanted:
    if s not in keep:
        print(f"hack/bench.sh: {s} does not fit: {format_size(max(room, 0))} free for data "
              f"under {path}; measuring without it", file=sys.stderr)
print(",".join(keep or [min(wanted, key=parse_size)]))
EOF
)"

"$py" -m csidriver --endpoint "unix://$sock" --pool "$work/pool" --nodeid bench-node \
  --log-level warning >"$out/driver.log" 2>&1 &
driver_pid=$!
for _ in $(seq 300); do
  if "$py" -m csidriver.cli --endpoint "unix://$sock" --timeout 2 pool >/dev/null 2>&1; then
    break
  fi
  kill -0 "$driver_pid" 2>/dev/null || { cat "$out/driver.log" >&2; exit 1; }
  sleep 0.1
done

baseline=()
[[ -n "${BASELINE_ENDPOINT:-}" ]] && baseline=(--baseline "$BASELINE_ENDPOINT")

"$py" -m csidriver.cli bench --endpoint "unix://$sock" "${baseline[@]}" \
  --sizes "$sizes" --iterations 20 --depth 50 --depth-repeats 10 \
  --list 10,1000,10000 --list-repeats 5 --concurrency 1,8,32 --per-caller 10 \
  --json "$out/bench.json" --html "$out/bench.html" "$@"
echo "hack/bench.sh: wrote $out/bench.json and $out/bench.html" >&2
