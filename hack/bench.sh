#!/usr/bin/env bash
# Regenerates the figures in BENCHMARKS.md with one command: starts a qsnap
# driver on a temporary pool, runs `qsnap bench` with the documented sizes,
# writes bench-out/bench.json and bench-out/bench.html, prints the table, and
# stops the driver and removes the pool afterwards (also on Ctrl-C).
#
# Usage: hack/bench.sh [more `qsnap bench` flags, which override the defaults]
# Environment:
#   BENCH_SIZES      volume sizes, filled and empty (default 1G,64G); a size the
#                    pool's filesystem cannot hold is shrunk to what fits, with a note
#   BENCH_DIR        where the temporary pool goes (default /var/tmp); it needs
#                    the sum of the sizes free, plus 4 GiB
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

# The filled source volumes of all sizes exist at once (the iterations
# alternate between sizes), so their sum must fit, with 4 GiB to spare for the
# driver's own files and the rest of the machine.  A size that does not fit is
# replaced by the largest whole GiB that does, with a note.
sizes="$("$py" - "${BENCH_SIZES:-1G,64G}" "$work" <<'EOF'
import os, sys
from csidriver.units import format_size, parse_size
wanted = sorted(sys.argv[1].split(","), key=parse_size)
st = os.statvfs(sys.argv[2])
room = st.f_bavail * st.f_frsize - (4 << 30)
keep: list[str] = []
for s in wanted:
    left = room - sum(parse_size(k) for k in keep)
    if parse_size(s) <= left:
        keep.append(s)
        continue
    fits = left >> 30
    print(f"hack/bench.sh: {s} does not fit next to {','.join(keep) or 'nothing'}: "
          f"{format_size(max(room, 0))} free for data under {sys.argv[2]}", file=sys.stderr)
    if fits >= 1 and (not keep or fits << 30 > parse_size(keep[-1])):
        keep.append(f"{fits}G")
        print(f"hack/bench.sh: measuring {fits}G instead", file=sys.stderr)
print(",".join(keep or [wanted[0]]))
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
echo "hack/bench.sh: done; the reports are in $out" >&2
