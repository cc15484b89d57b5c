#!/usr/bin/env bash
# Brings up a kind cluster with qsnap registered as a CSI driver, then runs a
# smoke test of the snapshot round trip and prints how long each step took:
#
#   1. kind cluster from hack/kind/cluster.yaml (pool host path + /dev mounted)
#   2. the qsnap image (Containerfile), built and loaded into the node
#   3. snapshot CRDs + snapshot-controller (deploy/kubernetes/snapshot-controller)
#   4. qsnap (deploy/kubernetes): CSIDriver, RBAC, node DaemonSet, classes
#   5. smoke test (deploy/kubernetes/examples/snapshot-restore): PVC bound, a
#      pod writes a token, VolumeSnapshot readyToUse, a PVC restored from it
#      holds the same token
#
# Needs a workstation with Docker, kind >= v0.33.0 and kubectl, and the loop
# and fuse kernel modules.  Run it again to rebuild and redeploy qsnap into
# the existing cluster.  hack/kind-down.sh deletes the cluster.
#
# Environment:
#   QSNAP_KIND_CLUSTER     cluster name (default qsnap)
#   QSNAP_KIND_NODE_IMAGE  kind node image (default: Kubernetes v1.37.0 built
#                          for kind v0.33.0, pinned by digest)
#   QSNAP_SMOKE_KEEP=1     keep the smoke test's namespace afterwards
#   QSNAP_SMOKE_SKIP=1     install only, no smoke test
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${QSNAP_KIND_CLUSTER:-qsnap}"
# kind's release notes list the node images built for each release; an image
# is only supported by the release that built it, hence the digest.
node_image="${QSNAP_KIND_NODE_IMAGE:-kindest/node:v1.37.0@sha256:a1ed56cfb0e7b93589bdf97c8cd566405a265939e3620fc4f5de89adff580ae5}"
min_kind="0.33.0"
# The tag node-daemonset.yaml runs (imagePullPolicy IfNotPresent: never pulled).
image="qsnap:dev"
pool_host_path="/var/lib/qsnap"
smoke_ns="qsnap-smoke"
examples="$repo/deploy/kubernetes/examples/snapshot-restore"

log() { printf '\033[1mqsnap-kind:\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
k() { kubectl --context "kind-$cluster" "$@"; }

now_ms() { date +%s%3N; }
timings=()
# step NAME COMMAND...: run a step and record its duration.
step() {
  local name="$1"; shift
  local start; start="$(now_ms)"
  log "$name"
  "$@"
  local ms=$(( $(now_ms) - start ))
  timings+=("$(printf '%8d ms  %s' "$ms" "$name")")
}

version_at_least() {  # version_at_least HAVE WANT (dotted, no leading v)
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

check_prerequisites() {
  local tool
  for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
  done
  docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (docker info fails)"
  local kind_version
  kind_version="$(kind version | sed -n 's/^kind v\([0-9][0-9.]*\).*/\1/p')"
  [[ -n "$kind_version" ]] || die "cannot read the kind version from: $(kind version)"
  version_at_least "$kind_version" "$min_kind" \
    || die "kind v$kind_version is older than v$min_kind, which built $node_image"
  # The node plugin attaches loop devices and mounts FUSE exports in the
  # host's kernel; a container cannot load the modules itself.
  [[ -e /dev/loop-control ]] || die "no /dev/loop-control: load the loop module (sudo modprobe loop)"
  [[ -e /dev/fuse ]] || die "no /dev/fuse: load the fuse module (sudo modprobe fuse)"
  if [[ ! -d "$pool_host_path" ]]; then
    mkdir -p "$pool_host_path" 2>/dev/null || sudo mkdir -p "$pool_host_path" \
      || die "cannot create the pool directory $pool_host_path"
  fi
}

create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    log "cluster $cluster exists; reusing it"
    return
  fi
  kind create cluster --name "$cluster" --image "$node_image" \
    --config "$repo/hack/kind/cluster.yaml" --wait 180s
}

build_image() {
  docker build -f "$repo/Containerfile" -t "$image" "$repo"
  kind load docker-image "$image" --name "$cluster"
}

install_snapshot_controller() {
  k apply -k "$repo/deploy/kubernetes/snapshot-controller"
  # CRs of these kinds (qsnap's VolumeSnapshotClass) are refused until the
  # API server serves the CRDs.
  k wait --for=condition=Established --timeout=60s \
    crd/volumesnapshotclasses.snapshot.storage.k8s.io \
    crd/volumesnapshotcontents.snapshot.storage.k8s.io \
    crd/volumesnapshots.snapshot.storage.k8s.io \
    crd/volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io \
    crd/volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io \
    crd/volumegroupsnapshots.groupsnapshot.storage.k8s.io
  k -n kube-system rollout status deployment/snapshot-controller --timeout=300s
}

install_qsnap() {
  k apply -k "$repo/deploy/kubernetes"
  # A rebuilt image keeps its tag, so an unchanged DaemonSet would keep the
  # old pods: restart them (harmless on a fresh install).
  k -n qsnap-system rollout restart daemonset/qsnap-node
  k -n qsnap-system rollout status daemonset/qsnap-node --timeout=300s
  # The kubelet knows the driver once node-driver-registrar registered it.
  for _ in $(seq 60); do
    if k get csinode -o jsonpath='{.items[*].spec.drivers[*].name}' | tr ' ' '\n' \
        | grep -qx qsnap.csi.dev; then
      return
    fi
    sleep 2
  done
  die "qsnap.csi.dev did not register with the kubelet (kubectl get csinode)"
}

diagnostics() {
  log "diagnostics follow"
  k -n "$smoke_ns" get pvc,volumesnapshot,pod -o wide || true
  k -n "$smoke_ns" describe pvc,volumesnapshot,pod || true
  k get volumesnapshotcontent -o wide || true
  k -n qsnap-system get pods -o wide || true
  k -n qsnap-system logs daemonset/qsnap-node --all-containers --prefix --tail=100 || true
}

wait_pod_succeeded() {  # wait_pod_succeeded NAME
  k -n "$smoke_ns" wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$1" --timeout=300s
}

smoke_provision_and_write() {
  k -n "$smoke_ns" apply -f "$examples/01-pvc.yaml" -f "$examples/02-writer-pod.yaml"
  wait_pod_succeeded qsnap-writer
  k -n "$smoke_ns" wait --for=jsonpath='{.status.phase}'=Bound pvc/qsnap-source --timeout=60s
  written="$(k -n "$smoke_ns" logs qsnap-writer | sed -n 's/^wrote //p')"
  [[ -n "$written" ]] || die "the writer pod printed no token"
}

smoke_unpublish() {
  # The volume must be closed (unstaged from the node) for the cut.
  k -n "$smoke_ns" delete pod qsnap-writer --wait=true --timeout=120s
}

smoke_snapshot() {
  k -n "$smoke_ns" apply -f "$examples/03-volumesnapshot.yaml"
  k -n "$smoke_ns" wait --for=jsonpath='{.status.readyToUse}'=true \
    volumesnapshot/qsnap-source-snap --timeout=300s
}

smoke_restore_and_read() {
  k -n "$smoke_ns" apply -f "$examples/04-restored-pvc.yaml" -f "$examples/05-reader-pod.yaml"
  wait_pod_succeeded qsnap-reader
  read_back="$(k -n "$smoke_ns" logs qsnap-reader | sed -n 's/^read //p')"
  [[ "$read_back" == "$written" ]] \
    || die "the restored volume holds '$read_back', the snapshot was taken of '$written'"
}

smoke_test() {
  k delete namespace "$smoke_ns" --ignore-not-found --wait=true --timeout=180s
  k create namespace "$smoke_ns"
  # Any failure from here on (a failed wait, die) shows what the cluster saw.
  trap diagnostics EXIT
  step "smoke: PVC bound, pod wrote a token" smoke_provision_and_write
  step "smoke: writer pod gone (volume unpublished)" smoke_unpublish
  step "smoke: VolumeSnapshot readyToUse" smoke_snapshot
  step "smoke: restored PVC holds the token" smoke_restore_and_read
  trap - EXIT
  log "smoke test passed: token $written came back from the snapshot"
  k -n "$smoke_ns" get pvc,volumesnapshot
  if [[ "${QSNAP_SMOKE_KEEP:-0}" != 1 ]]; then
    k delete namespace "$smoke_ns" --wait=false
  fi
}

written=""
read_back=""
started="$(now_ms)"
check_prerequisites
step "kind cluster $cluster" create_cluster
step "image $image built and loaded" build_image
step "snapshot CRDs and snapshot-controller" install_snapshot_controller
step "qsnap driver registered" install_qsnap
if [[ "${QSNAP_SMOKE_SKIP:-0}" != 1 ]]; then
  smoke_test
fi
log "timings:"
printf '%s\n' "${timings[@]}" >&2
log "total $(( $(now_ms) - started )) ms; kubectl context kind-$cluster"
