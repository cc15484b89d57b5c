#!/usr/bin/env bash
# Builds qsnap's minimal test guest into OUT_DIR:
#   OUT_DIR/vmlinuz      the host's Debian kernel (package linux-image-amd64)
#   OUT_DIR/initrd.gz    busybox-static, qemu-ga with the libraries ldd lists,
#                        the kernel modules for virtio disks, the agent's
#                        port and ext4, and hack/guest/init as /init
#   OUT_DIR/build.hash   the hash of every input: an unchanged input set
#                        is not rebuilt (idempotent, safe to call per test run)
# Usage: hack/guest/build.sh OUT_DIR
# Needs: linux-image-amd64 busybox-static qemu-guest-agent cpio (hack/install.sh).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
out="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

fail() { echo "guest build: $*" >&2; exit 1; }

# The newest installed kernel that has its modules next to it.
kernel=""
for candidate in $(ls -1v /boot/vmlinuz-* 2>/dev/null | sort -rV); do
  version="${candidate#/boot/vmlinuz-}"
  if [[ -f "/lib/modules/$version/modules.dep" ]]; then
    kernel="$candidate"
    break
  fi
done
[[ -n "$kernel" ]] || fail "no kernel with modules under /boot (install linux-image-amd64)"
[[ -r "$kernel" ]] || fail "$kernel is not readable"
moddir="/lib/modules/$version"
busybox="$(command -v busybox || true)"
[[ -n "$busybox" ]] || fail "busybox is not installed (install busybox-static)"
# A dynamically linked busybox would need its libraries too; the static one
# is the one the package list names.
if ldd "$busybox" >/dev/null 2>&1; then
  fail "$busybox is dynamically linked (install busybox-static)"
fi
qga="$(command -v qemu-ga || true)"
[[ -n "$qga" ]] || fail "qemu-ga is not installed (install qemu-guest-agent)"
command -v cpio >/dev/null || fail "cpio is not installed"

# Modules the guest needs, each after its dependencies (modules.dep lists a
# module's dependencies; modprobe loads them last-listed first).
wanted=(virtio_pci virtio_blk virtio_console crc32c_generic crc16 mbcache jbd2 ext4)
declare -A seen=()
order=()
dep_line() { grep -E "(^|/)$1\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" | head -n1; }
add_module() {
  local path="$1"
  [[ -n "${seen[$path]:-}" ]] && return 0
  local line deps i
  line="$(grep -E "^${path//./\\.}:" "$moddir/modules.dep" | head -n1)"
  deps=(${line#*:})
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
    add_module "${deps[i]}"
  done
  seen[$path]=1
  order+=("$path")
}
for name in "${wanted[@]}"; do
  line="$(dep_line "$name")"
  if [[ -z "$line" ]]; then
    # Built into this kernel: nothing to load.
    grep -qE "(^|/)$name\.ko" "$moddir/modules.builtin" 2>/dev/null && continue
    fail "module $name is neither in $moddir/modules.dep nor built in"
  fi
  add_module "${line%%:*}"
done

libs=($(ldd "$qga" | awk '/=>/ { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }' | sort -u))

# Inputs: this script, init, the binaries, the libraries and the modules.
hash="$(
  {
    sha256sum "$here/build.sh" "$here/init" "$kernel" "$busybox" "$qga" "${libs[@]}"
    for m in "${order[@]}"; do sha256sum "$moddir/$m"; done
  } | sha256sum | cut -d' ' -f1
)"
if [[ -f "$out/build.hash" && -f "$out/vmlinuz" && -f "$out/initrd.gz" ]] \
   && [[ "$(cat "$out/build.hash")" == "$hash" ]]; then
  echo "guest build: $out is up to date ($version)" >&2
  exit 0
fi

mkdir -p "$out"
work="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,mnt,lib/modules,usr/bin,usr/sbin,var}

cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
cp "$qga" "$root/usr/bin/qemu-ga"
for lib in "${libs[@]}"; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# The loader's canonical path must exist whatever ldd printed.
if [[ ! -e "$root/lib64/ld-linux-x86-64.so.2" && -e /lib64/ld-linux-x86-64.so.2 ]]; then
  mkdir -p "$root/lib64"
  cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi

: > "$root/etc/modules.order"
for m in "${order[@]}"; do
  base="$(basename "$m")"
  case "$base" in
    # busybox insmod reads plain ELF objects only.
    *.ko.xz) xz -dc "$moddir/$m" > "$root/lib/modules/${base%.xz}"; base="${base%.xz}" ;;
    *.ko.zst) zstd -qdc "$moddir/$m" > "$root/lib/modules/${base%.zst}"; base="${base%.zst}" ;;
    *.ko.gz) gzip -dc "$moddir/$m" > "$root/lib/modules/${base%.gz}"; base="${base%.gz}" ;;
    *) cp "$moddir/$m" "$root/lib/modules/$base" ;;
  esac
  echo "$base" >> "$root/etc/modules.order"
done
cp "$here/init" "$root/init"
chmod 0755 "$root/init"
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) \
  | gzip -6 > "$work/initrd.gz"
cp "$kernel" "$work/vmlinuz"
# QEMU runs as libvirt-qemu: everything it opens must be readable by others.
chmod 0644 "$work/initrd.gz" "$work/vmlinuz"
chmod 0755 "$out"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initrd.gz" "$out/initrd.gz"
echo "$hash" > "$out/build.hash"
chmod 0644 "$out/build.hash"
echo "guest build: built $out from $kernel ($(du -h "$out/initrd.gz" | cut -f1) initramfs)" >&2
