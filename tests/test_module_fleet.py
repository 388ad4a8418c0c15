"""module.nix: the fleet-rollout options (issue #14) reach the agent's command line.

Uses tests/test_module.py's evaluation harness (needs NIXPKGS_LIB, skipped
otherwise with that reason)."""

from __future__ import annotations

from test_module import URL, cfg, evaluate, exec_argv, flag_values, needs_eval, _nix_eval


@needs_eval
def test_fleetlock_options_reach_the_agent(tmp_path):
    r = evaluate(tmp_path, cfg(f'''
        url = "{URL}";
        switchMode = "boot";
        rebootMode = "reboot";
        fleetlock.url = "http://fleetlock.example.org:8080";
        fleetlock.group = "workers";
        extraArgs = [ "--verbose" ];
    '''))
    assert r["failedAssertions"] == []
    argv = exec_argv(r)
    assert flag_values(argv, "--fleetlock-url") == ["http://fleetlock.example.org:8080"]
    assert flag_values(argv, "--fleetlock-group") == ["workers"]
    assert argv[-1] == "--verbose"  # extraArgs stay last


@needs_eval
def test_no_fleetlock_flags_by_default(tmp_path):
    argv = exec_argv(evaluate(tmp_path, cfg(f'url = "{URL}"; fleetlock.group = "workers";')))
    assert "--fleetlock-url" not in argv and "--fleetlock-group" not in argv


@needs_eval
def test_bad_fleetlock_group_or_url_is_a_type_error(tmp_path):
    for body in ('fleetlock.url = "http://lock"; fleetlock.group = "two words";',
                 'fleetlock.url = "fleetlock.example.org";'):
        res = _nix_eval(tmp_path, cfg(f'url = "{URL}"; {body}'), "services")
        assert res.returncode != 0 and "fleetlock" in res.stderr, res.stderr
