#!/usr/bin/env bash
# Build the test images into $STRATA_FIXTURES (default .cache/fixtures),
# reusing what exists: each part is rebuilt only when its scripts change
# (NAME.stamp holds a hash of the scripts that made it). Every image is
# checked by scripts/fixtures/verify.py (digests, diff_ids, `umoci unpack`),
# which also writes NAME.tags (tag, layers, sizes, umoci verdict).
#   synth/   OCI layout: synthetic images from GNU tar, Python tarfile, bsdtar
#   bad/     OCI layout: images that must be refused, one tag per case
#   debian/  OCI layout: tags base (debootstrap minbase) and python (+python3)
#   apps/    OCI layout: app-0..app-149, each debian's base layer + a small app layer
# Details: scripts/fixtures/README.md. Needs root; debian/ needs network once.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."
FIX="${STRATA_FIXTURES:-$PWD/.cache/fixtures}"
mkdir -p "$FIX"
FIX=$(cd "$FIX" && pwd)
F=scripts/fixtures
stamp() { cat "$@" | sha256sum | cut -c1-16; }
build() { # name, stamp, command...
  local name=$1 st=$2; shift 2
  if [[ -f $FIX/$name.stamp && $(cat "$FIX/$name.stamp") == "$st" && -d $FIX/$name ]]; then
    echo "fixtures: $name is up to date" >&2
    return
  fi
  echo "fixtures: building $name" >&2
  local t0=$SECONDS
  rm -rf "${FIX:?}/$name" "$FIX/$name.stamp" "$FIX/$name.tags"
  "$@"
  echo "$st" >"$FIX/$name.stamp"
  echo "fixtures: $name took $((SECONDS - t0)) s" >&2
}
make_synth() {
  python3 $F/synth.py "$FIX/synth"
  python3 $F/verify.py "$FIX/synth" "$FIX/synth.tags" \
    --umoci-skip '(-|\+)zstd$=umoci-0.4.7-has-no-zstd' \
    --umoci-skip '^gnu-old(-tar|\+gzip)?$=umoci-0.4.7-rejects-old-GNU-sparse-typeflag-S'
}
make_bad() {
  python3 $F/bad.py "$FIX/bad"
  python3 $F/verify.py "$FIX/bad" "$FIX/bad.tags" --tags good
}
make_debian() {
  bash $F/debian.sh "$FIX/debian"
  python3 $F/verify.py "$FIX/debian" "$FIX/debian.tags"
}
build synth "$(stamp $F/synth.py $F/ocilayout.py $F/verify.py)" make_synth
build bad "$(stamp $F/bad.py $F/ocilayout.py $F/verify.py)" make_bad
build debian "$(stamp $F/debian.sh $F/verify.py)" make_debian
make_apps() {
  python3 $F/apps.py "$FIX/debian" "$FIX/apps" 150
  python3 $F/verify.py "$FIX/apps" "$FIX/apps.tags" --tags app-0,app-1
}
build apps "$(stamp $F/apps.py $F/ocilayout.py $F/verify.py "$FIX/debian.stamp")" make_apps
# The committed sample must be what its script makes (deterministic bytes).
tmp_sample=$(mktemp -d)
python3 $F/make-sample.py "$tmp_sample/hello"
if ! diff -r "$tmp_sample/hello" samples/hello >/dev/null; then
  rm -rf "$tmp_sample"
  echo "fixtures: samples/hello differs from scripts/fixtures/make-sample.py output; rerun it and commit" >&2
  exit 1
fi
rm -rf "$tmp_sample"
echo "fixtures: ready in $FIX (synth/, bad/, debian/, apps/; tag lists in *.tags)" >&2
