#!/usr/bin/env bash
# Build a systemd-sysext image of strata, as Flatcar ships overlaybd:
#
#   bash contrib/sysext/build.sh [OUT]        # OUT defaults to strata.raw (in OUT if a directory)
#
# OUT is an EROFS file written by strata itself (`strata export --erofs`,
# no mkfs.erofs) holding, owned by root:
#
#   usr/bin/strata                                        0755  (without debug info)
#   usr/lib/systemd/system/strata-snapshotter.service     0644  (ExecStart=/usr/bin/strata snapshotter)
#   usr/share/strata/containerd-strata.toml               0644  (contrib/containerd/strata.toml)
#   usr/lib/extension-release.d/extension-release.strata  0644  (ID=_any)
#
# and their parent directories (0755). The files are staged in a temp dir,
# made into a one-layer OCI layout, pulled into a temp store and exported.
# The same inputs give the same bytes.
#
# Keep the name strata.raw where it is installed: systemd-sysext loads
# NAME.raw only with usr/lib/extension-release.d/extension-release.NAME.
#
# Install: cp strata.raw /var/lib/extensions/ && systemd-sysext refresh
# (EXTENSION_RELOAD_MANAGER=1 reloads systemd), then import the drop-in
# into containerd's config (see the file) and
# `systemctl enable --now strata-snapshotter`.
#
# Environment:
#   STRATA             the strata binary to package and to build with
#                      (default: `strata` on PATH)
#   SOURCE_DATE_EPOCH  mtime of every entry (default 0)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
contrib=$(dirname "$here")
out=${1:-strata.raw}
strata=${STRATA:-$(command -v strata || true)}
epoch=${SOURCE_DATE_EPOCH:-0}

[[ -n $strata && -x $strata ]] || {
    echo "build.sh: no strata binary: set STRATA=PATH or put strata on PATH" >&2
    exit 1
}
for tool in python3:python3 strip:binutils; do
    command -v "${tool%%:*}" >/dev/null || {
        echo "build.sh: ${tool%%:*} is needed: apt-get install ${tool#*:}" >&2
        exit 1
    }
done
strata=$(realpath "$strata")
# A directory (e.g. /var/lib/extensions): strata.raw in it.
[[ -d $out ]] && out=$out/strata.raw
out_dir=$(dirname "$out")
[[ -d $out_dir ]] || { echo "build.sh: no directory $out_dir for $out" >&2; exit 1; }
out=$(realpath "$out_dir")/$(basename "$out")

# systemd's names for the architecture of the binary packaged (the host's).
case $(uname -m) in
    x86_64) arch=x86-64 ;;
    aarch64) arch=arm64 ;;
    *) arch= ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/strata-sysext.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree=$work/tree

# Without debug info, as the release profile builds it (a debug build
# shrinks tenfold).
install -d -m 0755 "$tree/usr/bin"
strip --strip-debug -o "$tree/usr/bin/strata" "$strata"
chmod 0755 "$tree/usr/bin/strata"
install -d -m 0755 "$tree/usr/lib/systemd/system"
sed 's#^ExecStart=/usr/local/bin/strata#ExecStart=/usr/bin/strata#' \
    "$contrib/systemd/strata-snapshotter.service" \
    >"$tree/usr/lib/systemd/system/strata-snapshotter.service"
grep -q '^ExecStart=/usr/bin/strata snapshotter$' "$tree/usr/lib/systemd/system/strata-snapshotter.service" || {
    echo "build.sh: no ExecStart=/usr/local/bin/strata to rewrite in $contrib/systemd/strata-snapshotter.service" >&2
    exit 1
}
install -D -m 0644 "$contrib/containerd/strata.toml" "$tree/usr/share/strata/containerd-strata.toml"
install -d -m 0755 "$tree/usr/lib/extension-release.d"
{
    echo "ID=_any"
    if [[ -n $arch ]]; then echo "ARCHITECTURE=$arch"; fi
    echo "EXTENSION_RELOAD_MANAGER=1"
} >"$tree/usr/lib/extension-release.d/extension-release.strata"
chmod 0644 "$tree"/usr/lib/systemd/system/* "$tree"/usr/lib/extension-release.d/*

# One uncompressed layer (owners 0:0, dirs 0755, files as staged, mtime
# $epoch, sorted names), its config and manifest: an OCI layout tagged sysext.
python3 - "$tree" "$work/layout" "$epoch" <<'PY'
import hashlib, json, os, shutil, sys, tarfile

tree, layout, epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
blobs = os.path.join(layout, "blobs", "sha256")
os.makedirs(blobs)

def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

def blob_of_file(path, media_type):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    size = os.path.getsize(path)
    shutil.move(path, os.path.join(blobs, h.hexdigest()))
    return {"mediaType": media_type, "digest": "sha256:" + h.hexdigest(), "size": size}

def blob(data, media_type):
    h = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, h), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + h, "size": len(data)}

def entry(t, rel):
    path = os.path.join(tree, rel)
    st = os.lstat(path)
    ti = tarfile.TarInfo(rel)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = epoch
    if os.path.isdir(path):
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        t.addfile(ti)
    else:
        ti.mode, ti.size = st.st_mode & 0o7777, st.st_size
        with open(path, "rb") as f:
            t.addfile(ti, f)

layer_path = os.path.join(layout, "layer.tar")
with tarfile.open(layer_path, "w", format=tarfile.PAX_FORMAT) as t:
    for top, dirs, files in os.walk(tree):
        dirs.sort()
        rel_top = os.path.relpath(top, tree)
        if rel_top != ".":
            entry(t, rel_top)
        for name in sorted(files):
            entry(t, os.path.normpath(os.path.join(rel_top, name)))
layer = blob_of_file(layer_path, "application/vnd.oci.image.layer.v1.tar")

config = blob(canonical({
    "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
    "os": "linux",
    "config": {},
    "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    "history": [{"created_by": "contrib/sysext/build.sh"}],
}), "application/vnd.oci.image.config.v1+json")
manifest = blob(canonical({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": config,
    "layers": [layer],
}), "application/vnd.oci.image.manifest.v1+json")
manifest["annotations"] = {"org.opencontainers.image.ref.name": "sysext"}
with open(os.path.join(layout, "oci-layout"), "wb") as f:
    f.write(canonical({"imageLayoutVersion": "1.0.0"}))
with open(os.path.join(layout, "index.json"), "wb") as f:
    f.write(canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest],
    }))
PY

image=oci:$work/layout:sysext
"$strata" --root "$work/store" --quiet pull "$image" >/dev/null
"$strata" --root "$work/store" --quiet export "$image" --erofs "$out"
echo "wrote $out ($(stat -c %s "$out") bytes): cp it to /var/lib/extensions/ and run systemd-sysext refresh"
