"""contrib/alerts.yml: checked and unit-tested with the real `promtool`.

promtool ships in Debian's `prometheus` package (`apt-get install prometheus`);
without it these tests are skipped, with that reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
RULES = CONTRIB / "alerts.yml"
RULE_TESTS = CONTRIB / "alerts.test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: `apt-get install prometheus`); cannot check contrib/alerts.yml",
)

EXPECTED_ALERTS = {
    "NixosAutodeployFailing",
    "NixosAutodeployNotRunning",
    "NixosAutodeployMetricsAbsent",
    "NixosAutodeployDirty",
    "NixosAutodeployRebootRequired",
    "NixosAutodeployRolledBack",
    "NixosAutodeployRollbackFailed",
    "NixosAutodeployQuarantined",
    "NixosAutodeploySuspended",
    "NixosAutodeployPointerRefused",
    # issue #13
    "NixosAutodeployPointerMalformed",
    "NixosAutodeployBootFailed",
    "NixosAutodeployBootSpace",
    "NixosAutodeployMetricsGone",
    "NixosAutodeployBehindUpstream",
    # Fleet rollouts (issue #14)
    "NixosAutodeployWaitingRebootSlot",
    "NixosAutodeployFleetLockFailing",
    "NixosAutodeployRolloutPaused",
    # A manual rollback is a verdict (issue #21)
    "NixosAutodeployManualRollback",
}


def promtool(*args: str, cwd: Path = CONTRIB) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def alert_names(text: str) -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", text, re.M)


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", str(RULES))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in output, output


@needs_promtool
def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS.name)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output and "FAILED" not in output, output


@needs_promtool
@pytest.mark.parametrize(
    "alert, old, new",
    [
        # fires after 30m instead of 6h: the "dirty for 1h" negative case catches it
        ("NixosAutodeployDirty", "for: 6h", "for: 30m"),
        # drops the "last run failed" condition: the healthy no-op host with an
        # old last_success must then fire, and the test must notice
        ("NixosAutodeployFailing", "(nixos_autodeploy_last_run_success == 0)",
         "(nixos_autodeploy_last_run_success >= 0)"),
        # a malformed pointer paging as a possible attack
        ("NixosAutodeployPointerRefused", 'reason=~"signature|revision|host|expired"}',
         'reason=~"signature|revision|host|expired|malformed"}'),
        # issue #13: plausible mistakes in the new rules
        ("NixosAutodeployPointerMalformed", 'reason="malformed"} == 1', 'reason=~".+"} == 1'),
        ("NixosAutodeployBootFailed", "increase(nixos_autodeploy_boot_failures_total[1h]) > 0",
         "nixos_autodeploy_boot_failures_total > 0"),
        ("NixosAutodeployBootSpace", "nixos_autodeploy_boot_free_bytes < nixos_autodeploy_boot_needed_bytes",
         "nixos_autodeploy_boot_free_bytes < 2 * nixos_autodeploy_boot_needed_bytes"),
        ("NixosAutodeployMetricsGone", "[1d])\n          unless", "[1d])\n          or"),
        ("NixosAutodeployBehindUpstream", "and (nixos_autodeploy_reboot_window_wait == 0)\n", "\n"),
        # waiting for a free slot is not a lock server failure
        ("NixosAutodeployFleetLockFailing", 'kind!="slot_busy"', 'kind=~".+"'),
        # an old manual rollback must not fire for ever
        ("NixosAutodeployManualRollback", "increase(nixos_autodeploy_manual_rollbacks_total[1h]) > 0",
         "nixos_autodeploy_manual_rollbacks_total > 0"),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path, alert, old, new):
    """The unit tests are not vacuous: a plausible mistake in a rule fails them."""
    text = RULES.read_text()
    assert text.count(old) == 1, f"mutation anchor {old!r} not unique in alerts.yml"
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"broken {alert} rule passed the unit tests:\n{output}"
    assert "FAILED" in output and alert in output, output


def test_rules_have_severity_annotations_and_runbook():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed; structural checks of alerts.yml skipped")
    doc = yaml.safe_load(RULES.read_text())
    (group,) = doc["groups"]
    assert group["name"] == "nixos-autodeploy"
    names = [rule["alert"] for rule in group["rules"]]
    assert sorted(names) == sorted(EXPECTED_ALERTS)
    for rule in group["rules"]:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert "$labels.instance" in annotations["summary"] or name == "NixosAutodeployMetricsAbsent", name
        assert "Runbook:" in annotations["description"], name


def test_every_alert_has_positive_and_negative_unit_tests():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed; structural checks of alerts.test.yml skipped")
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires, quiet = set(), set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alert_names(RULES.read_text())) == EXPECTED_ALERTS
    assert EXPECTED_ALERTS - fires == set(), "alerts never tested firing"
    assert EXPECTED_ALERTS - quiet == set(), "alerts never tested staying quiet"
