#!/usr/bin/env bash
# Fetch the offline text corpora used by fasp_ext (same layout as fasp_ext/data.py):
#   r-cran-janeaustenr  -> Jane Austen's six novels (R lazy-load database)
#   jargon-text         -> the Jargon File 4.4.7
# into $FASP_EXT_DATA_DIR (default ~/.cache/fasp_ext/data)/<package>/ via
# `apt-get download` + `dpkg-deb -x`.  Idempotent: already unpacked packages are skipped.
# If apt cannot find a package and we are root, runs `apt-get update` once and retries.
set -euo pipefail

DATA_DIR="${FASP_EXT_DATA_DIR:-$HOME/.cache/fasp_ext/data}"
TIMEOUT="${FASP_EXT_APT_TIMEOUT:-120}"
mkdir -p "$DATA_DIR"
cd "$DATA_DIR"

declare -A MARKER=(
  [r-cran-janeaustenr]="usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
  [jargon-text]="usr/share/doc/jargon-text/jargon.txt.gz"
)

updated=0
download() {
  local pkg="$1"
  if timeout "$TIMEOUT" apt-get download "$pkg"; then return 0; fi
  if [ "$updated" = 0 ] && [ "$(id -u)" = 0 ]; then
    echo "apt-get download $pkg failed; running apt-get update and retrying" >&2
    timeout 600 apt-get update -qq || true
    updated=1
    timeout "$TIMEOUT" apt-get download "$pkg" && return 0
  fi
  echo "error: could not download $pkg (try: sudo apt-get update; cd $DATA_DIR && apt-get download $pkg)" >&2
  return 1
}

for pkg in r-cran-janeaustenr jargon-text; do
  marker="${MARKER[$pkg]}"
  if [ -e "$pkg/$marker" ]; then
    echo "$pkg: already in $DATA_DIR/$pkg"
    continue
  fi
  shopt -s nullglob
  debs=("$pkg"_*.deb)
  shopt -u nullglob
  if [ "${#debs[@]}" = 0 ]; then
    download "$pkg"
    shopt -s nullglob; debs=("$pkg"_*.deb); shopt -u nullglob
  fi
  deb="${debs[-1]}"
  tmp="$(mktemp -d ".${pkg}.tmp-XXXXXX")"
  dpkg-deb -x "$deb" "$tmp"
  if [ ! -e "$tmp/$marker" ]; then
    echo "error: $deb does not contain $marker" >&2
    rm -rf "$tmp"
    exit 1
  fi
  chmod 755 "$tmp"
  rm -rf "$pkg"
  mv "$tmp" "$pkg"
  echo "$pkg: unpacked $deb into $DATA_DIR/$pkg"
done
