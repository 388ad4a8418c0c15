#!/bin/sh
# The VM tier (tests/vm/): builds the guest image and the base state once
# (cached in $VM_WORKDIR, default /var/tmp/autodeploy-vmtier), then runs the
# scenarios.  Extra arguments go to pytest, e.g. one scenario by name:
#   sh tests/vm/run.sh -k test_boot_deploy_reboot_and_verify
set -eu
cd "$(dirname "$0")/../.."
export AUTODEPLOY_VM_TESTS=1
exec python3 -m pytest tests/vm -p no:cacheprovider -v "$@"
