#!/usr/bin/env bash
# Deletes the kind cluster that hack/kind-up.sh created.
#
# The pool on the host (/var/lib/qsnap, mounted into the node) is kept: it may
# also be the pool of a driver run outside the cluster (hack/demo.sh as root
# uses the same default).  --wipe-pool removes its contents too, for a clean
# next cluster; it refuses while a driver holds the pool's lock.
#
# Environment: QSNAP_KIND_CLUSTER (default qsnap), as for kind-up.sh.
set -euo pipefail

cluster="${QSNAP_KIND_CLUSTER:-qsnap}"
pool_host_path="/var/lib/qsnap"
wipe=0
case "${1:-}" in
  "") ;;
  --wipe-pool) wipe=1 ;;
  *) echo "usage: $0 [--wipe-pool]" >&2; exit 2 ;;
esac

log() { printf '\033[1mqsnap-kind:\033[0m %s\n' "$*" >&2; }

command -v kind >/dev/null || { log "error: kind is not installed"; exit 1; }
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind delete cluster --name "$cluster"
else
  log "no kind cluster named $cluster"
fi

if [[ "$wipe" == 1 && -d "$pool_host_path" ]]; then
  as_root=()
  [[ -w "$pool_host_path" ]] || as_root=(sudo)
  # The driver holds an exclusive flock on <pool>/.lock while it runs
  # (engine/layout.py); wiping under a live driver would destroy its volumes.
  if [[ -e "$pool_host_path/.lock" ]] \
      && ! "${as_root[@]}" flock --nonblock "$pool_host_path/.lock" true; then
    log "error: a qsnap driver still holds $pool_host_path/.lock; not wiping"
    exit 1
  fi
  "${as_root[@]}" find "$pool_host_path" -mindepth 1 -delete
  log "wiped $pool_host_path"
fi
