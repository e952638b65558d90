#!/bin/sh
# Install or upgrade edgeseq on this board from this bundle (idempotent: run it again to upgrade
# in place; stream states in /var/lib/edgeseq are kept).
# Usage: sudo ./install.sh [--no-systemd] [--wheelhouse DIR] [--prefix DIR] [--etc DIR] [--cache DIR]
set -eu

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bundle.env
. "$here/bundle.env"

prefix=/opt/edgeseq
etc=/etc/edgeseq
cache=/var/cache/edgeseq
systemd=1
wheelhouse=""
python=${PYTHON:-python3}

usage() { sed -n '4s/^# //p' "$0"; }
say() { printf 'edgeseq install: %s\n' "$*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --no-systemd) systemd=0 ;;
    --wheelhouse) wheelhouse=${2:?--wheelhouse needs a folder}; shift ;;
    --prefix) prefix=${2:?--prefix needs a folder}; shift ;;
    --etc) etc=${2:?--etc needs a folder}; shift ;;
    --cache) cache=${2:?--cache needs a folder}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$version" in
  3.1[0-9]) ;;
  *) echo "install.sh: edgeseq needs Python 3.10 or newer; $python is $version" >&2; exit 1 ;;
esac

venv="$prefix/venv"
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python" -m venv "$venv"
fi

set -- --constraint "$here/constraints.txt"
if [ -n "$wheelhouse" ]; then
  set -- "$@" --no-index --find-links "$wheelhouse"
fi
say "installing edgeseq $EDGESEQ_VERSION for $EDGESEQ_DEVICE (runtime and daemon, no PyTorch)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
  "$here/wheels/${EDGESEQ_WHEEL}[daemon]"
# pip keeps an installed edgeseq of the same version number, and every bundle of this version is
# numbered alike: reinstall edgeseq itself (only it) so that this bundle's code is what runs.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
  --force-reinstall --no-deps "$here/wheels/${EDGESEQ_WHEEL}"

# No cache to clear on an upgrade: Numba's cache entries of the runtime's kernels are stamped
# with a digest of every runtime source and the edgeseq version (edgeseq/runtime/kernels/kernel_cache.py),
# so the warmup below recompiles exactly when the code changed and loads the cache otherwise.

install -d -m 0755 "$etc"
install -m 0644 "$here/model.onnx" "$etc/model.onnx"
sed -e "s#/etc/edgeseq#$etc#g" "$here/serve.toml" > "$etc/serve.toml.new"
mv "$etc/serve.toml.new" "$etc/serve.toml"
install -m 0644 "$here/README.md" "$etc/README.md"

say "compiling the kernels for this CPU (once; minutes on a small board)"
install -d -m 0755 "$cache/numba"
NUMBA_CACHE_DIR="$cache/numba" NUMBA_NUM_THREADS="$EDGESEQ_THREADS" \
  "$venv/bin/edgeseq" warmup "$etc/model.onnx"

if [ "$systemd" = 1 ]; then
  sed -e "s#/opt/edgeseq#$prefix#g" -e "s#/etc/edgeseq#$etc#g" -e "s#/var/cache/edgeseq#$cache#g" \
    "$here/edgeseq.service" > /etc/systemd/system/edgeseq.service
  systemctl daemon-reload
  systemctl enable edgeseq.service
  # A restart sends SIGTERM (the old process writes its last checkpoint); the new one restores it.
  systemctl restart edgeseq.service
  say "running: systemctl status edgeseq; journalctl -u edgeseq -f"
else
  say "installed without systemd; start it with:"
  say "  NUMBA_CACHE_DIR=$cache/numba $venv/bin/edgeseq serve --config $etc/serve.toml"
fi
