"""Where the tests find nixpkgs' lib/ to evaluate module.nix with: one lookup
for tests/test_module.py and the VM tier (tests/vm/scenario.py), in this order:

1. $NIXPKGS_LIB.  When set it is the answer: a wrong path is reported, not
   passed over for another lib/.
2. ../shared/nixpkgs-lib/lib next to the repository.
3. <nixpkgs/lib> as nix resolves it (NIX_PATH, the channels, or where this nix
   supports it the flake registry): `nix-instantiate --find-file`, offline (in
   a private network namespace when root) and bounded by a timeout.

Without any, the evaluation tests skip, the reason saying how to get one; under
CI (CI=true, or NIXOS_AUTODEPLOY_REQUIRE_EVAL=1 as the flake check sets) they
fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIND_TIMEOUT = 10.0  # seconds for `nix-instantiate --find-file`
# Offline: a cached tarball is never stale, a download is tried once.
FIND_OPTIONS = ("--option", "tarball-ttl", "4294967295", "--option", "download-attempts", "1")
HOW_TO_GET = ("set NIXPKGS_LIB to a nixpkgs lib/ directory, or clone one next to the repository "
              "(git clone https://github.com/nix-community/nixpkgs.lib ../shared/nixpkgs-lib), "
              "or make <nixpkgs> resolvable (NIX_PATH=nixpkgs=/path/to/nixpkgs)")


def is_lib(path: Path) -> bool:
    return (path / "default.nix").is_file()


def find_nixpkgs_lib(env: Mapping[str, str] = os.environ, repo: Path = REPO,
                     nix_instantiate: str | None = None,
                     timeout: float = FIND_TIMEOUT) -> tuple[Path | None, str]:
    """(lib/, where it came from), or (None, why not and how to get one)."""
    if env.get("NIXPKGS_LIB"):
        path = Path(env["NIXPKGS_LIB"])
        if is_lib(path):
            return path, "$NIXPKGS_LIB"
        return None, f"NIXPKGS_LIB={path} is not a nixpkgs lib/ (no default.nix in it): {HOW_TO_GET}"
    beside = repo.parent / "shared" / "nixpkgs-lib" / "lib"
    if is_lib(beside):
        return beside, str(beside)
    nix_instantiate = nix_instantiate or shutil.which("nix-instantiate", path=env.get("PATH"))
    if nix_instantiate is None:
        return None, f"no nixpkgs lib/ at {beside}, and no nix-instantiate to look for <nixpkgs/lib>: {HOW_TO_GET}"
    found, tried = nix_find_lib(nix_instantiate, env, timeout)
    if found is not None:
        return found, "<nixpkgs/lib>"
    return None, f"no nixpkgs lib/ at {beside}, and {tried}: {HOW_TO_GET}"


def nix_find_lib(nix_instantiate: str, env: Mapping[str, str], timeout: float) -> tuple[Path | None, str]:
    """<nixpkgs/lib> as nix resolves it, offline; or (None, what happened)."""
    argv = [nix_instantiate, "--find-file", "nixpkgs/lib", *FIND_OPTIONS]
    unshare = shutil.which("unshare", path=env.get("PATH"))
    attempts = [argv]
    if os.geteuid() == 0 and unshare:
        # No network at all; where namespaces are not allowed, the options above.
        attempts.insert(0, [unshare, "--net", "--", *argv])
    for attempt in attempts:
        try:
            r = subprocess.run(attempt, capture_output=True, text=True, env=dict(env), timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None, f"nix-instantiate --find-file nixpkgs/lib took more than {timeout:g} s"
        if r.returncode != 0 and r.stderr.startswith("unshare:"):
            continue
        path = Path(r.stdout.strip())
        if r.returncode == 0 and path.is_absolute() and is_lib(path):
            return path, ""
        return None, "nix cannot resolve <nixpkgs/lib>"
    return None, "nix cannot resolve <nixpkgs/lib>"


def required(env: Mapping[str, str] = os.environ) -> bool:
    """In CI the evaluation tests must run: a missing lib/ fails them."""
    return env.get("CI", "").lower() == "true" or env.get("NIXOS_AUTODEPLOY_REQUIRE_EVAL") == "1"


def skip_or_fail(reason: str) -> None:
    import pytest
    if required():
        pytest.fail(f"module evaluation is required in CI but impossible: {reason}")
    pytest.skip(reason)
