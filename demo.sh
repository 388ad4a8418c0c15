#!/bin/sh
# Try nixos-autodeploy on any Linux machine with root: installs Debian's nix
# when missing, then runs a full pull deploy in private mount namespaces
# (tests/demo.py, built on the test world). Nothing on the machine changes.
set -eu
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: needs root (mount namespaces); run: sudo ./demo.sh" >&2
  exit 2
fi
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
