#!/bin/sh
# Run the benchmark on a Debian machine as root: installs what is missing
# (nix-bin, curl, python3, util-linux's unshare) with apt-get, then runs
# bench/bench.py with Debian's /usr/bin/python3.  Arguments are passed on
# (see `bench/run.sh --help`); `bench/run.sh admission` runs bench/admission.py.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh: needs root (mount namespaces, bind mounts over /nix): sudo bench/run.sh" >&2
    exit 2
fi
missing=""
command -v nix-store >/dev/null 2>&1 || missing="$missing nix-bin"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
command -v unshare >/dev/null 2>&1 || missing="$missing util-linux"
[ -x /usr/bin/python3 ] || missing="$missing python3"
if [ -n "$missing" ]; then
    echo "bench/run.sh: installing$missing" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi
# The hosts bind-mount their own store over /nix: the mount point must exist.
[ -d /nix ] || mkdir /nix
# `bench/run.sh admission [--reps N]`: admission to running, with and without
# the prefetch (bench/admission.py).
if [ "${1:-}" = admission ]; then
    shift
    exec /usr/bin/python3 bench/admission.py "$@"
fi
exec /usr/bin/python3 bench/bench.py "$@"
