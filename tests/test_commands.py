"""The README's commands work as written (issue #20, part 4): `./demo.sh` and
`./tests/run.sh` run as root without sudo (a minimal Debian root shell has
none), and started by another user they re-run themselves with sudo, saying
so in one line; without sudo they say in one line what to do.

The other user is uid 65534 (setpriv); `sudo` is a stand-in on PATH that
prints the argv it was given.  The whole demo as root with a `sudo` that fails
when called: test_ops.py::test_demo_runs_end_to_end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo.sh"
RUN = REPO / "tests" / "run.sh"
NOBODY = [shutil.which("setpriv") or "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]

FAKE_SUDO = "#!/bin/sh\nfor a in \"$@\"; do printf 'sudo-argv:%s\\n' \"$a\"; done\n"
FAILING_SUDO = "#!/bin/sh\necho 'sudo was called' >&2\nexit 97\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (util-linux) to start the scripts as another user")


@pytest.fixture
def bin_dir():
    """A PATH directory the other user can read (pytest's tmp_path is 0700),
    holding only `id` and `dirname`: what the scripts need before the check."""
    d = Path(tempfile.mkdtemp(prefix="autodeploy-cmds-"))
    try:
        d.chmod(0o755)
        for tool in ("id", "dirname"):
            (d / tool).symlink_to(shutil.which(tool))
        yield d
    finally:
        shutil.rmtree(d)


def put(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text)
    (directory / name).chmod(0o755)


def as_nobody(script: Path, *args: str, path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, str(script), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(path), **env}, cwd="/")


def sudo_argv(stdout: str) -> list[str]:
    return [line[len("sudo-argv:"):] for line in stdout.splitlines() if line.startswith("sudo-argv:")]


def test_demo_as_another_user_reruns_itself_with_sudo(bin_dir):
    put(bin_dir, "sudo", FAKE_SUDO)
    r = as_nobody(DEMO, "--x", "a b", path=bin_dir)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "demo.sh: needs root (mount namespaces): re-running with sudo\n"
    assert sudo_argv(r.stdout) == ["--", "sh", str(DEMO), "--x", "a b"]


def test_run_sh_as_another_user_reruns_itself_with_sudo_keeping_the_lib_lookup(bin_dir):
    put(bin_dir, "sudo", FAKE_SUDO)
    lib = "/some dir/$(id)/lib"   # passed on as one word, never evaluated
    r = as_nobody(RUN, "-k", "safety", path=bin_dir, NIXPKGS_LIB=lib, CI="true")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "tests/run.sh: needs root (packages, real nix): re-running with sudo\n"
    assert sudo_argv(r.stdout) == ["--", "env", f"NIXPKGS_LIB={lib}", "CI=true", "sh", str(RUN), "-k", "safety"]


@pytest.mark.parametrize("script, name", [(DEMO, "demo.sh"), (RUN, "tests/run.sh")])
def test_another_user_without_sudo_is_told_what_to_do(bin_dir, script, name):
    r = as_nobody(script, path=bin_dir)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"{name}: needs root") and "sudo is not installed" in r.stderr
    assert f"su root -c ./{name}" in r.stderr


def test_run_sh_as_root_needs_no_sudo(bin_dir):
    """As root the script goes on to pytest without sudo (no apt-get on this
    PATH, so it installs nothing; `--version` makes pytest stop there)."""
    put(bin_dir, "sudo", FAILING_SUDO)
    put(bin_dir, "actionlint", "#!/bin/sh\nexit 0\n")   # so that it installs nothing with pip
    (bin_dir / "python3").symlink_to(sys.executable)
    r = subprocess.run([str(RUN), "--version"], capture_output=True, text=True, timeout=120,
                       env={"PATH": str(bin_dir)}, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "sudo was called" not in r.stderr and "re-running" not in r.stderr
    assert "tests/run.sh: running the tests" in r.stderr
    assert "pytest" in r.stdout + r.stderr

