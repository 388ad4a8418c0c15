#!/bin/sh
# Try nixos-autodeploy on any Linux machine with root: installs Debian's nix
# when missing, then runs a full pull deploy in private mount namespaces
# (tests/demo.py, built on the test world). Nothing on the machine changes.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
# Root is needed for the mount namespaces: another user re-runs the demo with
# sudo; a root shell (a minimal Debian machine has no sudo) needs none.
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    echo "demo.sh: needs root (mount namespaces): re-running with sudo" >&2
    exec sudo -- sh "$here/demo.sh" "$@"
  fi
  echo "demo.sh: needs root (mount namespaces) and sudo is not installed: run it as root (su root -c ./demo.sh)" >&2
  exit 2
fi
cd "$here"
if ! command -v nix-store >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "demo.sh: installing Debian's nix-bin ..." >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >&2
  else
    echo "demo.sh: needs nix (nix-store, nix-build) on PATH" >&2
    exit 2
  fi
fi
exec python3 tests/demo.py
