#!/usr/bin/env bash
# Prepare the strata test VM: QEMU, the Debian bookworm cloud kernel (unpacked,
# never installed) and a busybox initramfs that mounts /dev/vda (ext4) and runs
# a command in it (see init.sh, boot.py). Idempotent; fast when done.
#   scripts/vm/setup.sh [DIR]     DIR: $STRATA_VM_DIR or <repo>/.cache/vm
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-${STRATA_VM_DIR:-$(cd "$here/../.." && pwd)/.cache/vm}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
log() { echo "vm-setup: $*" >&2; }

# 1. Host packages (qemu-utils only for qemu-img: qcow2 tests, optional).
missing=()
for p in qemu-system-x86 busybox-static; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The kernel package the cloud metapackage depends on (local apt data only).
# Fast path: nothing changed since the last run (inputs, apt lists, outputs).
local_inputs="busybox=$(dpkg-query -W -f='${Version}' busybox-static)"
local_inputs+=" init=$(sha256sum "$here/init.sh" | cut -c1-16)"
local_inputs+=" setup=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [[ -f $DIR/stamp && -e $DIR/vmlinuz && -s $DIR/initramfs.cpio.gz &&
      $(cut -d' ' -f3- "$DIR/stamp") == "$local_inputs" &&
      -z $(find /var/lib/apt/lists -maxdepth 1 -newer "$DIR/stamp" -print -quit) ]]; then
  exit 0
fi
resolve() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}
pkg=$(resolve)
if [[ -z $pkg ]]; then
  log "linux-image-cloud-amd64 not known to apt; running apt-get update"
  apt-get update -qq
  pkg=$(resolve)
fi
[[ -n $pkg ]] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
ver=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -n1)
stamp="$pkg $ver $local_inputs"
if [[ -f $DIR/stamp && $(cat "$DIR/stamp") == "$stamp" && -e $DIR/vmlinuz &&
      -s $DIR/initramfs.cpio.gz ]]; then
  touch "$DIR/stamp"
  exit 0
fi

# 3. Download and unpack the kernel package (kept unpacked in DIR/kernel).
if [[ ! -f $DIR/kernel/.done || $(cat "$DIR/kernel/.done") != "$pkg $ver" ]]; then
  log "downloading $pkg $ver"
  rm -rf "$DIR/kernel" "$DIR/dl"
  mkdir -p "$DIR/dl"
  # cd so the .deb lands in DIR/dl; _apt cannot write there (root-only): fine.
  (cd "$DIR/dl" && apt-get download "$pkg=$ver" 2>&1 | grep -v 'unsandboxed' >&2 || true)
  deb=$(ls "$DIR/dl/${pkg}_"*.deb 2>/dev/null | head -n1)
  [[ -n $deb ]] || { log "apt-get download $pkg=$ver failed"; exit 1; }
  dpkg-deb -x "$deb" "$DIR/kernel"
  rm -rf "$DIR/dl"
  echo "$pkg $ver" >"$DIR/kernel/.done"
fi
kver=${pkg#linux-image-}
ln -sfn "kernel/boot/vmlinuz-$kver" "$DIR/vmlinuz"
echo "$pkg $ver" >"$DIR/kernel-version"
moddir=$DIR/kernel/lib/modules/$kver
config=$DIR/kernel/boot/config-$kver

# 4. Modules needed for a virtio block disk with ext4, dependencies first.
# Each is loaded only if =m in the kernel config; =y ones are built in.
wanted=(virtio_pci virtio_mmio virtio_blk crc16 crc32c_generic crc32c_intel mbcache jbd2 ext4
        qemu_fw_cfg)  # qemu_fw_cfg: long commands come in fw_cfg (boot.py)
declare -A path=() seen=()
while IFS= read -r -d '' f; do
  n=$(basename "$f"); n=${n%%.ko*}; path[${n//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko*' -print0)
deps_of() { # module name -> its dependency names
  local n=$1 f=${path[$1]} line
  if [[ -f $moddir/modules.dep ]]; then
    line=$(grep -m1 -E "(^|/)${n//_/[-_]}\\.ko[^:]*:" "$moddir/modules.dep" | cut -d: -f2)
    for d in $line; do d=$(basename "$d"); d=${d%%.ko*}; echo "${d//-/_}"; done
    return
  fi
  case $f in  # no modules.dep in the .deb (depmod runs at install): use .modinfo
    *.ko) cat "$f" ;; *.ko.xz) xz -dc "$f" ;; *.ko.zst) zstd -dc "$f" ;; *.ko.gz) gzip -dc "$f" ;;
  esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' '\n' | sed '/^$/d; s/-/_/g'
}
order=()
visit() {
  local n=$1
  [[ -n ${seen[$n]:-} ]] && return
  seen[$n]=1
  [[ -n ${path[$n]:-} ]] || return 0   # built in (or absent): nothing to load
  local d
  for d in $(deps_of "$n"); do visit "$d"; done
  order+=("$n")
}
for m in "${wanted[@]}"; do
  if [[ -z ${path[$m]:-} ]] && ! grep -qE "/${m//_/[-_]}\\.ko$" "$moddir/modules.builtin"; then
    log "note: module $m neither modular nor built in"
  fi
  visit "$m"
done
for sym in VIRTIO_BLK EXT4_FS; do
  grep -qE "^CONFIG_$sym=[ym]" "$config" || { log "kernel lacks CONFIG_$sym"; exit 1; }
done
log "modules: ${order[*]:-none}"

# 5. The initramfs: busybox + applet links, modules (decompressed), /init.
tmp=$(mktemp -d "$DIR/initramfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,dev,proc,sys,newroot,etc,lib/modules}
cp /bin/busybox "$tmp/bin/busybox"
for a in $(/bin/busybox --list); do
  [[ $a == busybox ]] || ln -s busybox "$tmp/bin/$a"
done
for m in "${order[@]}"; do
  f=${path[$m]}
  case $f in
    *.ko) cp "$f" "$tmp/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" >"$tmp/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dc "$f" >"$tmp/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$tmp/lib/modules/$m.ko" ;;
  esac
done
printf '%s\n' "${order[@]}" >"$tmp/etc/modules.list"
install -m 0755 "$here/init.sh" "$tmp/init"
mknod -m 600 "$tmp/dev/console" c 5 1 2>/dev/null || true
(cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null) |
  gzip -9n >"$DIR/initramfs.cpio.gz.new"
mv "$DIR/initramfs.cpio.gz.new" "$DIR/initramfs.cpio.gz"
rm -f "$DIR/accel"   # new kernel or init: probe the accelerator again
echo "$stamp" >"$DIR/stamp"
log "ready: $DIR/vmlinuz ($pkg $ver), $DIR/initramfs.cpio.gz ($(du -k "$DIR/initramfs.cpio.gz" | cut -f1) KiB)"
