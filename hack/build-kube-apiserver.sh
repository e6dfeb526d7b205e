#!/usr/bin/env bash
# Build kube-apiserver from Debian bookworm's source package (Kubernetes 1.20.2) and cache it
# outside the repository. Used by the test harness (tests/harness/kube.py) when the cached binary
# is missing. Idempotent: exits at once when the binary is already cached.
#
# Why from source: no registry we can reach ships a kube-apiserver binary; Debian ships the
# source with vendor/. The vendored modern-go/reflect2 1.0.1 crashes under Go 1.19 (bookworm's
# Go), so we swap in Debian's packaged reflect2.
set -euo pipefail

CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
BIN="$CACHE_DIR/bin/kube-apiserver"
if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
  echo "kube-apiserver cached at $BIN"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

# A deb-src entry for bookworm, next to the deb entries the machine already has.
SRC_LIST=/etc/apt/sources.list.d/kubetune-deb-src.sources
if [[ ! -f "$SRC_LIST" ]]; then
  $SUDO tee "$SRC_LIST" >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  $SUDO apt-get update -qq
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  dpkg-dev golang-go rsync golang-github-modern-go-reflect2-dev >/dev/null

WORK="$CACHE_DIR/build"
rm -rf "$WORK"
mkdir -p "$WORK" "$CACHE_DIR/bin"
cd "$WORK"
echo "fetching Debian's kubernetes source package into $WORK"
apt-get source -qq --download-only kubernetes >/dev/null
dpkg-source -x --skip-patches kubernetes_*.dsc src >/dev/null
cd src

rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod

echo "building kube-apiserver (several minutes on 2 cores)"
export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" CGO_ENABLED=0 GOFLAGS=-mod=vendor
make WHAT=cmd/kube-apiserver >"$WORK/build.log" 2>&1 || { tail -50 "$WORK/build.log"; exit 1; }
install -m 0755 _output/bin/kube-apiserver "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
cd /
rm -rf "$WORK"
"$BIN" --version
