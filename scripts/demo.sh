#!/usr/bin/env bash
# README's first command: build strata and run the main job on the sample
# image that ships with the repository (samples/hello, an OCI layout), in a
# local store. No daemon, no network (once the deps are installed).
set -euo pipefail
trap 'echo "demo.sh: FAILED (line $LINENO)" >&2' ERR
cd "$(dirname "$0")/.."
REPO=$PWD
if ((EUID != 0)); then
  echo "demo.sh: needs root (it installs packages and mounts the image)" >&2
  exit 1
fi
bash scripts/install-deps.sh
if [[ -n ${STRATA_BIN:-} ]]; then
  S=$STRATA_BIN # a strata binary built elsewhere: skip the build
else
  cargo build --release -p strata-cli
  S="${CARGO_TARGET_DIR:-$REPO/target}/release/strata"
fi
export STRATA_ROOT="${STRATA_ROOT:-$REPO/.cache/demo-store}"
OUT="$REPO/.cache/demo-export"
IMAGE=oci:samples/hello:latest
# The manifest digest of the sample's `latest` tag: IMAGE's other name.
DIGEST=$(python3 -c 'import json,sys; print(next(m["digest"] for m in json.load(open(sys.argv[1]))["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "latest"))' samples/hello/index.json)
rm -rf "$OUT" "$OUT.tar" "$OUT.erofs" "$OUT.ext4"
set -x
"$S" pull "$IMAGE"
"$S" images
"$S" inspect "$DIGEST" | sed -n 1,40p
"$S" export "$IMAGE" "$OUT"
find "$OUT" | sort | sed -n 1,40p
"$OUT/usr/bin/hello"
"$S" export "$IMAGE" --tar "$OUT.tar"
tar tvf "$OUT.tar" | sed -n 1,40p
"$S" pull "$IMAGE"   # second pull: nothing downloaded or written
# composefs mount: one EROFS image (metadata) + overlayfs over the store's objects
MNT="$REPO/.cache/demo-mnt"
mkdir -p "$MNT"
if mountpoint -q "$MNT"; then "$S" umount "$MNT"; fi
"$S" mount "$IMAGE" "$MNT"
grep " $MNT " /proc/self/mountinfo
"$MNT/usr/bin/hello"
"$S" umount "$MNT"
"$S" verify "$IMAGE"
"$S" export "$IMAGE" --erofs "$OUT.erofs"   # self-contained, for a microVM
# a VM template: an ext4 image of exactly 64 MiB, then grown to 256 MiB
"$S" rootfs build --from "$IMAGE" --size 64MiB --name hello-vm
"$S" rootfs build --from-template hello-vm --size 256MiB --name hello-vm-big
"$S" rootfs build --from "$IMAGE" --size 64MiB --name hello-vm   # cached
"$S" rootfs ls
"$S" rootfs export hello-vm-big "$OUT.ext4"
e2fsck -fn "$OUT.ext4"
# served as a file: chunks come from the store as they are read
"$S" rootfs serve hello-vm-big "$OUT.served"
e2fsck -fn "$OUT.served"
"$S" mounts
"$S" umount "$OUT.served"
"$S" fsck
{ set +x; } 2>/dev/null
echo "demo.sh: OK (store $STRATA_ROOT, export $OUT)"
