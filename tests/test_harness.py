"""The test harness itself (issue #20, part 4): where the module tests find
nixpkgs' lib/ (tests/nixpkgs_lib.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nixpkgs_lib
from nixpkgs_lib import find_nixpkgs_lib

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NIX_INSTANTIATE = shutil.which("nix-instantiate")


def make_lib(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "default.nix").write_text("{ }\n")
    return path


def script(path: Path, text: str) -> str:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NIXPKGS_LIB", "NIX_PATH", "CI", "NIXOS_AUTODEPLOY_REQUIRE_EVAL", "PYTEST_ADDOPTS")}
    return {**env, **extra}


# --------------------------------------------------------------------------
# The lookup: $NIXPKGS_LIB, ../shared/nixpkgs-lib/lib, <nixpkgs/lib>, then none

@pytest.fixture
def places(tmp_path):
    """A clone at repo/ with a lib/ beside it, one named by NIXPKGS_LIB, and
    a nixpkgs on a NIX_PATH."""
    repo = tmp_path / "repo"
    repo.mkdir()
    return {"repo": repo, "env": make_lib(tmp_path / "mine" / "lib"),
            "beside": make_lib(tmp_path / "shared" / "nixpkgs-lib" / "lib"),
            "channel": make_lib(tmp_path / "channel" / "nixpkgs" / "lib")}


def test_lookup_order(places, tmp_path):
    repo = places["repo"]
    nix_path = f"nixpkgs={places['channel'].parent}"
    env = clean_env(NIXPKGS_LIB=str(places["env"]), NIX_PATH=nix_path)
    assert find_nixpkgs_lib(env, repo) == (places["env"], "$NIXPKGS_LIB")
    env["NIXPKGS_LIB"] = ""  # empty is unset
    assert find_nixpkgs_lib(env, repo) == (places["beside"], str(places["beside"]))
    del env["NIXPKGS_LIB"]
    assert find_nixpkgs_lib(env, repo) == (places["beside"], str(places["beside"]))
    shutil.rmtree(places["beside"])
    if NIX_INSTANTIATE is None:
        nixpkgs_lib.skip_or_fail("nix-instantiate not found (Debian: apt-get install nix-bin)")
    assert find_nixpkgs_lib(env, repo) == (places["channel"], "<nixpkgs/lib>")   # the real nix-instantiate
    env["NIX_PATH"] = f"nixpkgs={tmp_path / 'nowhere'}"
    lib, why = find_nixpkgs_lib(env, repo)
    assert lib is None
    assert "nix cannot resolve <nixpkgs/lib>" in why and str(tmp_path / "shared" / "nixpkgs-lib" / "lib") in why
    for how in ("set NIXPKGS_LIB", "git clone https://github.com/nix-community/nixpkgs.lib ../shared/nixpkgs-lib",
                "NIX_PATH=nixpkgs="):
        assert how in why


def test_a_wrong_nixpkgs_lib_is_reported_not_passed_over(places):
    env = clean_env(NIXPKGS_LIB=str(places["env"].parent))   # mine/, not mine/lib
    lib, why = find_nixpkgs_lib(env, places["repo"])
    assert lib is None and why.startswith(f"NIXPKGS_LIB={places['env'].parent} is not a nixpkgs lib/")


def test_without_nix_instantiate_the_reason_says_how_to_get_a_lib(tmp_path):
    (tmp_path / "repo").mkdir()
    lib, why = find_nixpkgs_lib(clean_env(PATH=str(tmp_path)), tmp_path / "repo")
    assert lib is None and "no nix-instantiate" in why and "set NIXPKGS_LIB" in why


def test_nix_lookup_is_bounded_and_checks_what_nix_says(tmp_path):
    (tmp_path / "repo").mkdir()
    slow = script(tmp_path / "slow", "exec sleep 30\n")
    lib, why = find_nixpkgs_lib(clean_env(), tmp_path / "repo", nix_instantiate=slow, timeout=0.5)
    assert lib is None and "took more than 0.5 s" in why
    for answer in ("relative/lib", str(tmp_path)):   # not absolute; no default.nix
        fake = script(tmp_path / "fake", f"echo '{answer}'\n")
        assert find_nixpkgs_lib(clean_env(), tmp_path / "repo", nix_instantiate=fake)[0] is None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_nix_lookup_has_no_network(tmp_path):
    (tmp_path / "repo").mkdir()
    lib = make_lib(tmp_path / "nixpkgs" / "lib")
    # Answers only where no network interface but lo is to be seen.
    fake = script(tmp_path / "nix-instantiate",
                  "if grep -v -e '|' -e '^ *lo:' /proc/net/dev | grep -q ':'; then exit 1; fi\n"
                  f"echo '{lib}'\n")
    assert find_nixpkgs_lib(clean_env(), tmp_path / "repo", nix_instantiate=fake) == (lib, "<nixpkgs/lib>")


def run_module_test(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_module.py::test_harness_unit_option_merge",
         "-q", "-rsf", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env(**env))


def test_without_a_lib_module_tests_skip_saying_how_but_fail_under_ci(tmp_path):
    wrong = str(tmp_path / "no-such-lib")
    r = run_module_test(NIXPKGS_LIB=wrong)
    assert r.returncode == 0 and re.search(r"^1 skipped in ", r.stdout, re.M), r.stdout + r.stderr
    assert f"NIXPKGS_LIB={wrong} is not a nixpkgs lib/" in r.stdout
    for ci in ({"CI": "true"}, {"NIXOS_AUTODEPLOY_REQUIRE_EVAL": "1"}):
        r = run_module_test(NIXPKGS_LIB=wrong, **ci)
        assert r.returncode == 1 and re.search(r"^1 error in ", r.stdout, re.M), r.stdout + r.stderr
        assert "module evaluation is required in CI but impossible" in r.stdout

