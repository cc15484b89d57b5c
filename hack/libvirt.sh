#!/usr/bin/env bash
# Starts, stops or reports libvirt for qsnap's VM tests on a machine without
# systemd (CI, containers): virtlogd first (QEMU's console and log go through
# it), then libvirtd.  Only daemons this script started are ever stopped, by
# the pids it recorded under /run/qsnap-test/; a libvirt that was already
# running is used as it is and left alone.
# Usage (as root): hack/libvirt.sh start|stop|status
# Env: QSNAP_LIBVIRT_URI (default qemu:///system), QSNAP_LIBVIRT_WAIT (s, default 30)
set -euo pipefail

uri="${QSNAP_LIBVIRT_URI:-qemu:///system}"
wait_s="${QSNAP_LIBVIRT_WAIT:-30}"
state=/run/qsnap-test

answers() { virsh -c "$uri" version >/dev/null 2>&1; }

alive() {  # alive PID NAME: the pid runs a process of that name
  [[ -n "$1" && -r "/proc/$1/comm" ]] && [[ "$(cat "/proc/$1/comm")" == "$2" ]]
}

daemon_pid() {  # the pid a daemon wrote to its own pid file, if it runs
  local name="$1" pid=""
  [[ -r "/run/$name.pid" ]] && pid="$(cat "/run/$name.pid")"
  if alive "$pid" "$name"; then echo "$pid"; fi
}

start_one() {  # start_one NAME: start NAME -d unless it runs; record its pid
  local name="$1" pid i
  pid="$(daemon_pid "$name")"
  if [[ -n "$pid" ]]; then
    echo "libvirt.sh: $name already runs (pid $pid), using it" >&2
    return 0
  fi
  command -v "$name" >/dev/null || { echo "libvirt.sh: $name is not installed (libvirt-daemon-system)" >&2; return 1; }
  "$name" -d
  for ((i = 0; i < 50; i++)); do
    pid="$(daemon_pid "$name")"
    [[ -n "$pid" ]] && break
    sleep 0.1
  done
  if [[ -z "$pid" ]]; then
    echo "libvirt.sh: $name -d did not leave a running daemon (see its log under /var/log/libvirt)" >&2
    return 1
  fi
  echo "$pid" > "$state/$name.pid"
  echo "libvirt.sh: started $name (pid $pid)" >&2
}

stop_one() {  # stop_one NAME: stop NAME if this script started it
  local name="$1" pid i
  [[ -f "$state/$name.pid" ]] || return 0
  pid="$(cat "$state/$name.pid")"
  if alive "$pid" "$name"; then
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
      alive "$pid" "$name" || break
      sleep 0.1
    done
    if alive "$pid" "$name"; then
      echo "libvirt.sh: $name (pid $pid) ignored SIGTERM for 10 s, killing it" >&2
      kill -KILL "$pid"
    fi
    echo "libvirt.sh: stopped $name (pid $pid)" >&2
  fi
  rm -f "$state/$name.pid"
}

case "${1:-}" in
  start)
    [[ $(id -u) -eq 0 ]] || { echo "libvirt.sh: run as root" >&2; exit 1; }
    mkdir -p "$state"
    if answers; then
      echo "libvirt.sh: $uri already answers" >&2
      exit 0
    fi
    start_one virtlogd
    start_one libvirtd
    for ((i = 0; i < wait_s * 10; i++)); do
      if answers; then
        echo "libvirt.sh: $uri answers" >&2
        exit 0
      fi
      sleep 0.1
    done
    echo "libvirt.sh: $uri did not answer within ${wait_s}s" >&2
    virsh -c "$uri" version >&2 || true
    exit 1
    ;;
  stop)
    # libvirtd first: it talks to virtlogd while it shuts down.
    stop_one libvirtd
    stop_one virtlogd
    ;;
  status)
    for name in virtlogd libvirtd; do
      pid="$(daemon_pid "$name")"
      owner="not started by libvirt.sh"
      [[ -f "$state/$name.pid" && "$(cat "$state/$name.pid")" == "$pid" ]] && owner="started by libvirt.sh"
      if [[ -n "$pid" ]]; then echo "$name: running (pid $pid, $owner)"; else echo "$name: not running"; fi
    done
    if answers; then echo "$uri: answers"; else echo "$uri: does not answer"; exit 3; fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
