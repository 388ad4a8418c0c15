#!/bin/sh
# The VM tier (tests/vm/): builds the guest image and the base state once
# (cached in $VM_WORKDIR, default /var/tmp/autodeploy-vmtier), then runs the
# scenarios.  Extra arguments go to pytest, e.g. one scenario by name:
#   sh tests/vm/run.sh -k test_boot_deploy_reboot_and_verify
# VM_JOBS=2 runs two VMs side by side (two pytest processes, the scenarios
# split by their expected time); their outputs follow each other at the end.
set -eu
cd "$(dirname "$0")/../.."
export AUTODEPLOY_VM_TESTS=1
jobs=${VM_JOBS:-1}
python3 tests/vm/harness.py prepare
if [ "$jobs" -le 1 ]; then
  exec python3 -m pytest tests/vm -p no:cacheprovider -v "$@"
fi
out=$(mktemp -d)
pids=""
i=1
while [ "$i" -le "$jobs" ]; do
  python3 -m pytest tests/vm -p no:cacheprovider -v --vm-shard="$i/$jobs" "$@" > "$out/shard-$i.log" 2>&1 &
  pids="$pids $!"
  i=$((i + 1))
done
rc=0
for pid in $pids; do
  # pytest's 5: this runner's share selected no scenario (with -k).
  wait "$pid" || { st=$?; [ "$st" = 5 ] || rc=1; }
done
i=1
while [ "$i" -le "$jobs" ]; do
  echo "=== VM tier, runner $i of $jobs ==="
  cat "$out/shard-$i.log"
  i=$((i + 1))
done
rm -rf "$out"
exit $rc
