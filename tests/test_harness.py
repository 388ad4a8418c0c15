"""The test harness itself (issue #20, part 4): where the module tests find
nixpkgs' lib/ (tests/nixpkgs_lib.py), and the summary line per tier at the end
of the suite (tests/tiers.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
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
    assert re.search(r"^module evaluation: +0 passed, 0 failed, 1 skipped$", r.stdout, re.M)  # conftest's summary
    for ci in ({"CI": "true"}, {"NIXOS_AUTODEPLOY_REQUIRE_EVAL": "1"}):
        r = run_module_test(NIXPKGS_LIB=wrong, **ci)
        assert r.returncode == 1 and re.search(r"^1 error in ", r.stdout, re.M), r.stdout + r.stderr
        assert "module evaluation is required in CI but impossible" in r.stdout


# --------------------------------------------------------------------------
# The summary: one line per tier

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import pytest
import tiers
import helpers

def pytest_configure(config):
    tiers.register(config)
    config.addinivalue_line("markers", "vm: the VM tier")

@pytest.fixture
@tiers.declare("real nix")
def world():
    return "world"

@pytest.fixture
def host(world):
    return world

@pytest.fixture
def nginx():
    return helpers.Nginx()
"""

HELPERS = """
import tiers

@tiers.declare("real servers")
class Nginx:
    pass
"""

TEST_A = """
import pytest
import helpers
from helpers import Nginx

def start():
    return Nginx()

def test_unit_pass(): pass
def test_unit_fail(): assert False
def test_unit_skip(): pytest.skip("nothing here")
def test_nix_through_a_fixture(host): pass
@pytest.mark.skip(reason="no nix")
def test_nix_skipped(world): pass
def test_servers_by_module_attribute(host): helpers.Nginx()
def test_servers_through_a_helper(): start()
def test_servers_through_a_fixture(nginx): pass
def test_servers_in_a_lambda():
    make = lambda: helpers.Nginx()
    make()
@pytest.mark.tier("module evaluation")
def test_marked(world): pass
@pytest.mark.vm
def test_vm(): pass
"""

TEST_B = """
import pytest
pytestmark = pytest.mark.tier("model-based")
def test_model(world): pass
"""

TIER_LINE = re.compile(r"^([a-zA-Z -]+): +(\d+) passed, (\d+) failed, (\d+) skipped(?:, (\d+) not run)?$", re.M)


def tier_lines(tmp_path: Path, *args: str) -> dict[str, tuple[int, ...]]:
    for name, text in (("conftest.py", CONFTEST), ("helpers.py", HELPERS), ("test_a.py", TEST_A),
                       ("test_b.py", TEST_B)):
        (tmp_path / name).write_text(textwrap.dedent(text))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=clean_env())
    assert "what ran, by tier" in r.stdout, r.stdout + r.stderr
    return {m[1]: tuple(int(n or 0) for n in m.groups()[1:]) for m in TIER_LINE.finditer(r.stdout)}


def test_one_line_per_tier_every_test_in_one(tmp_path):
    assert tier_lines(tmp_path) == {
        "unit": (1, 1, 1, 0), "real nix": (1, 0, 1, 0), "real servers": (4, 0, 0, 0),
        "module evaluation": (1, 0, 0, 0), "model-based": (1, 0, 0, 0), "VM": (1, 0, 0, 0)}


def test_tier_lines_count_what_ran(tmp_path):
    # Deselected tests are not counted; those after a -x stop are "not run".
    assert tier_lines(tmp_path, "-k", "not fail and not servers") == {
        "unit": (1, 0, 1, 0), "real nix": (1, 0, 1, 0), "module evaluation": (1, 0, 0, 0),
        "model-based": (1, 0, 0, 0), "VM": (1, 0, 0, 0)}
    assert tier_lines(tmp_path, "-x") == {
        "unit": (1, 1, 0, 1), "real nix": (0, 0, 0, 2), "real servers": (0, 0, 0, 4),
        "module evaluation": (0, 0, 0, 1), "model-based": (0, 0, 0, 1), "VM": (0, 0, 0, 1)}


def test_the_suites_tests_are_placed_by_what_they_use(tmp_path):
    """The real wiring: conftest's world, servers.py's servers, the markers of
    test_module.py, test_model.py and tests/vm."""
    (tmp_path / "dump_tiers.py").write_text(textwrap.dedent("""
        def pytest_collection_finish(session):
            import tiers
            for item in session.items:
                print("TIER", tiers.tier_of(item), item.nodeid)
    """))
    files = ["tests/test_unit.py", "tests/test_fetch.py", "tests/test_state.py", "tests/test_module.py",
             "tests/test_model.py", "tests/test_promote.py", "tests/vm/test_vm.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-p", "dump_tiers",
                        *files], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=clean_env(PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    placed = {nodeid: tier for tier, nodeid in (line[len("TIER "):].rsplit(" ", 1)
                                                for line in r.stdout.splitlines() if line.startswith("TIER "))}
    assert placed["tests/test_unit.py::test_parse_plain_pointer_with_metadata"] == "unit"
    assert placed["tests/test_fetch.py::test_validators_belong_to_one_url"] == "real servers"
    assert placed["tests/test_promote.py::test_promote_through_real_prometheus"] == "real servers"
    assert placed["tests/test_state.py::test_planted_temp_file_symlinks_in_a_shared_metrics_directory"] == "real nix"
    assert placed["tests/test_module.py::test_defaults"] == "module evaluation"
    assert placed["tests/test_model.py::test_model"] == "model-based"
    assert placed["tests/vm/test_vm.py::test_switch_deploy"] == "VM"
