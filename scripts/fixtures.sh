#!/usr/bin/env bash
# Build the test images into $STRATA_FIXTURES (default .cache/fixtures),
# reusing what exists: each part is rebuilt only when its scripts change.
#   synth/   OCI layout: synthetic images from GNU tar, Python tarfile, bsdtar
#   bad/     OCI layout: images that must be refused, one tag per case
#   debian/  OCI layout: debian:base (debootstrap minbase) and python (+python3)
set -euo pipefail
cd "$(dirname "$0")/.."
FIX="${STRATA_FIXTURES:-$PWD/.cache/fixtures}"
mkdir -p "$FIX"
F=scripts/fixtures
stamp() { cat "$@" | sha256sum | cut -c1-16; }
build() { # name, stamp, command...
  local name=$1 st=$2; shift 2
  if [[ -f $FIX/$name.stamp && $(cat "$FIX/$name.stamp") == "$st" && -d $FIX/$name ]]; then
    return
  fi
  echo "fixtures: building $name" >&2
  local t0=$SECONDS
  rm -rf "${FIX:?}/$name" "$FIX/$name.stamp"
  "$@"
  echo "$st" >"$FIX/$name.stamp"
  echo "fixtures: $name took $((SECONDS - t0)) s" >&2
}
build synth "$(stamp $F/synth.py $F/ocilayout.py)" python3 $F/synth.py "$FIX/synth"
build bad "$(stamp $F/bad.py $F/ocilayout.py)" python3 $F/bad.py "$FIX/bad"
build debian "$(stamp $F/debian.sh)" bash $F/debian.sh "$FIX/debian"
