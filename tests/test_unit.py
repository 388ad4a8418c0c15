"""Pure logic: parsing, validation, decisions, windows, metrics rendering, CLI.
No root, no nix, no network: these run anywhere (also in the flake's check phase)."""

from __future__ import annotations

import json

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autodeploy as ad  # noqa: E402

H = "0123456789abcdfghijklmnpqrsvwxyz"
A = f"/nix/store/{H}-nixos-system-a"
B = f"/nix/store/{'1' * 32}-nixos-system-b"
C = f"/nix/store/{'2' * 32}-nixos-system-c"
D = f"/nix/store/{'3' * 32}-nixos-system-d"
AGENT = Path(__file__).resolve().parent.parent / "autodeploy.py"


# -- pointer parsing ---------------------------------------------------------

def test_parse_plain_pointer_with_metadata():
    p = ad.parse_pointer(f"\n  {A}  \nrevision: 12\nhosts: web1 web2\n".encode())
    assert p.path == A and p.revision == 12 and p.metadata == {"revision": "12", "hosts": "web1 web2"}


@pytest.mark.parametrize("body,needle", [
    (b"", "empty"), (b"\n\n", "empty"), (b"<html>", "not a store path"), (b"/nix/store/abc", "store hash"),
    (f"/nix/store/{H}".encode(), "store hash"), (f"/nix/store/{H}-".encode(), "name"),
    (f"/nix/store/{H}-.hidden".encode(), "name"), (f"/nix/store/{H}-a b".encode(), "name"),
    (f"/nix/store/{H}-x.drv".encode(), "derivation"), (f"/nix/store/{H}-x/bin".encode(), "name"),
    (A.encode() + b"\x00", "NUL"), (b"\xff" + A.encode(), "UTF-8"), (f"{A}\nnot metadata".encode(), "key: value"),
    (f"{A}\nrevision: ten".encode(), "whole number"), (f"/nix/store/{'e' * 32}-x".encode(), "store hash"),
    (f"/nix//store/{H}-x".encode(), "not a store path"), (f"/nix/store/{H}-{'n' * 212}".encode(), "name"),
])
def test_parse_refuses(body, needle):
    with pytest.raises(ad.PointerError) as exc:
        ad.parse_pointer(body)
    assert needle in str(exc.value)
    assert exc.value.exit_code == 4


def test_refusal_shows_input_escaped_and_truncated():
    with pytest.raises(ad.PointerError) as exc:
        ad.parse_pointer(b"\x1b[2J" + b"x" * 1000)
    msg = str(exc.value)
    assert "\\x1b" in msg and "\x1b" not in msg and "(1004 characters)" in msg and len(msg) < 300


def test_parse_json_field():
    body = f'{{"buildoutputs": {{"out": {{"path": "{A}"}}}}}}'.encode()
    assert ad.parse_pointer(body, "buildoutputs.out.path").path == A
    with pytest.raises(ad.PointerError, match="no field"):
        ad.parse_pointer(body, "buildoutputs.dev.path")
    with pytest.raises(ad.PointerError, match="not JSON"):
        ad.parse_pointer(b"<html>", "x")


# -- decisions (the table) ----------------------------------------------------

def view(current, profile, booted=None):
    return ad.HostView(current, booted or current, profile)


def rec(deployed=None, staged_from=None, activation="switch"):
    return ad.State(deployed=deployed, staged_from=staged_from, activation=activation)


def phase_and_plan(host, upstream, state, force, holds=None):
    facts = ad.Facts(host, "boot-1", False, None, False, True)
    phase = ad.host_phase(state, facts)
    relation = ad.upstream_relation(state, host, upstream)
    return ad.plan(phase, relation, state, host, upstream, force=force, fleetlock=False, mode="switch",
                   holds=holds or {})


@pytest.mark.parametrize("host,upstream,state,force,phase,steps,dirty", [
    (view(A, A), A, rec(), False, "untracked", ["track"], False),                        # start tracking
    (view(A, A), A, rec(A), False, "settled", [], False),                                # up to date
    (view(A, B), B, rec(B, A, "boot"), False, "staged", ["reboot_release"], False),      # reboot pending
    (view(A, A), B, rec(A), False, "settled", ["deploy", "reboot_release"], False),      # new upstream
    (view(A, B), C, rec(B, A, "boot"), False, "staged", ["deploy", "reboot_release"], False),
    (view(B, B), B, rec(A), False, "dirty", ["resume"], False),                          # resume tracking
    (view(A, A), B, rec(), False, "untracked", [], True),                                # no record
    (view(C, C), B, rec(A), False, "dirty", [], True),                                   # nixos-rebuild switch
    (view(C, A), B, rec(A), False, "dirty", [], True),                                   # nixos-rebuild test
    (view(A, C), B, rec(A), False, "dirty", [], True),                                   # nixos-rebuild boot
    (view(A, B), C, rec(B, A, "switch"), False, "dirty", [], True),   # switch deploy, current moved back
    (view(A, A), A, rec(), True, "untracked", ["track"], False),
    (view(C, C), B, rec(A), True, "dirty", ["deploy", "reboot_release"], False),         # --force
])
def test_phase_and_plan_table(host, upstream, state, force, phase, steps, dirty):
    decided = phase_and_plan(host, upstream, state, force)
    assert decided.phase.value == phase
    assert [s.kind.value for s in decided.steps] == steps and decided.dirty == dirty, decided.reason


def deployed_then(deployed, *earlier):
    """A record of `deployed` whose history shows `earlier` systems deployed (and run) before it."""
    state = rec(deployed)
    state.history = [{"time": 1.0, "path": p, "action": "switch", "outcome": "deployed"} for p in (*earlier, deployed)]
    return state


@pytest.mark.parametrize("hold, steps", [
    ({}, ["deploy", "reboot_release"]),                                   # it runs: it realises by itself
    ({ad.Hold.WAVE: "not yet"}, ["prefetch", "deploy", "reboot_release"]),  # it waits: ready before its turn
])
def test_prefetch_only_where_the_deploy_waits_for_its_wave(hold, steps):
    decided = phase_and_plan(view(A, A), B, rec(A), False, hold)
    assert [s.kind.value for s in decided.steps] == steps
    assert all(not s.held for s in decided.steps if s.kind == ad.StepKind.PREFETCH)
    for other in (ad.Hold.SUSPEND, ad.Hold.PAUSE, ad.Hold.QUARANTINE, ad.Hold.STOP):
        decided_prefetch = phase_and_plan(view(A, A), B, rec(A), False, {ad.Hold.WAVE: "x", other: "y"})
        (prefetch,) = [s for s in decided_prefetch.steps if s.kind == ad.StepKind.PREFETCH]
        assert other in [h for h, _ in prefetch.held], other
    # A staged release whose successor waits: the reboot first, then the prefetch.
    staged = phase_and_plan(view(A, B), C, rec(B, A, "boot"), False, {ad.Hold.WAVE: "x"})
    assert [s.kind.value for s in staged.steps] == ["reboot_release", "prefetch", "deploy"]


@pytest.mark.parametrize("host, state, accept, phase, steps, dirty", [
    (view(A, A), deployed_then(B, A), True, "rolled_back_by_hand", ["accept_rollback"], False),
    (view(A, A), deployed_then(B, A), False, "rolled_back_by_hand", [], True),   # option off: dirty as before
    (view(C, C), deployed_then(B, A), True, "dirty", [], True),                  # never deployed here
    (view(A, B), deployed_then(B, A), True, "dirty", [], True),                  # nixos-rebuild test: profile stays
    (view(B, A), deployed_then(B, A), True, "dirty", [], True),                  # nixos-rebuild boot --rollback
])
def test_a_hand_rollback_to_a_system_deployed_here_is_its_own_phase(host, state, accept, phase, steps, dirty):
    facts = ad.Facts(host, "boot-1", False, None, False, True)
    decided = ad.plan(ad.host_phase(state, facts), ad.upstream_relation(state, host, D), state, host, D, force=False,
                      fleetlock=False, mode="switch", holds={}, accept_manual_rollback=accept)
    assert decided.phase.value == phase
    assert [s.kind.value for s in decided.steps] == steps and decided.dirty == dirty, decided.reason


def test_the_table_covers_every_possible_pair_and_holds_apply_in_one_place():
    for phase in ad.Phase:
        assert any(key[0] == phase for key in ad.DECISION_TABLE), phase
    # Follow-through first: verification, fallback and a rollback reboot come before a new deploy.
    for (phase, _), kinds in ad.DECISION_TABLE.items():
        if ad.StepKind.DEPLOY in kinds:
            first = kinds.index(ad.StepKind.DEPLOY)
            assert not {ad.StepKind.VERIFY, ad.StepKind.REBOOT_ROLLBACK} & set(kinds[first:]), phase
    holds = {ad.Hold.SUSPEND: "suspended", ad.Hold.WAVE: "not yet"}
    decided = phase_and_plan(view(A, A), B, rec(A), False, holds)
    prefetch, deploy = decided.steps[:2]
    assert deploy.kind == ad.StepKind.DEPLOY and [h for h, _ in deploy.held] == [ad.Hold.SUSPEND, ad.Hold.WAVE]
    # The prefetch waits for a suspend, never for the wave (that is its point).
    assert prefetch.kind == ad.StepKind.PREFETCH and [h for h, _ in prefetch.held] == [ad.Hold.SUSPEND]
    assert ad.apply_holds(ad.Step(ad.StepKind.VERIFY), {ad.Hold.SUSPEND: "x"}).held == ()
    assert ad.apply_holds(ad.Step(ad.StepKind.REBOOT_ROLLBACK), {ad.Hold.PAUSE: "x"}).held == ()
    assert ad.apply_holds(ad.Step(ad.StepKind.REBOOT_RELEASE), {ad.Hold.PAUSE: "x"}).held == ((ad.Hold.PAUSE, "x"),)


# -- reboot windows --------------------------------------------------------------

def at(hh, mm):
    return time.struct_time((2026, 1, 1, hh, mm, 0, 0, 1, 0))


@pytest.mark.parametrize("window,hh,mm,inside", [
    ("02:00-04:00", 2, 0, True), ("02:00-04:00", 3, 59, True), ("02:00-04:00", 4, 0, False),
    ("02:00-04:00", 1, 59, False), ("23:30-01:00", 23, 30, True), ("23:30-01:00", 0, 59, True),
    ("23:30-01:00", 1, 0, False), ("23:30-01:00", 12, 0, False),
])
def test_in_window(window, hh, mm, inside):
    assert ad.in_window(ad.parse_window(window), at(hh, mm)) is inside


@pytest.mark.parametrize("bad", ["2-4", "24:00-01:00", "01:00-01:00", "01:60-02:00", "x", "01:00"])
def test_parse_window_refuses(bad):
    with pytest.raises(Exception):
        ad.parse_window(bad)


# -- small helpers ---------------------------------------------------------------

def test_redact_url():
    assert ad.redact_url("https://user:s3cret@host:8443/p?x=1") == "https://***@host:8443/p?x=1"
    assert ad.redact_url("http://host/p") == "http://host/p"


def test_allowed_signers_from_public_keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# ci keys\nssh-ed25519 AAAAC3Nza one@ci\n\nssh-ed25519 AAAAC3Nzb two@ci\n")
    text = ad.allowed_signers(str(f))
    assert text.splitlines() == [
        'nixos-autodeploy namespaces="nixos-autodeploy" ssh-ed25519 AAAAC3Nza one@ci',
        'nixos-autodeploy namespaces="nixos-autodeploy" ssh-ed25519 AAAAC3Nzb two@ci']
    f.write_text('ci@example namespaces="nixos-autodeploy" ssh-ed25519 AAAAC3Nza\n')
    assert ad.allowed_signers(str(f)) == 'ci@example namespaces="nixos-autodeploy" ssh-ed25519 AAAAC3Nza\n'


def test_metrics_render_escapes_labels_and_has_one_state():
    state = ad.State(deployed=A, upstream='/nix/store/x"\\\n', last_state="deployed", last_run=1.5,
                     last_run_success=False, last_error={"kind": "fetch", "message": 'bad "quote"\nline'})
    text = ad.render_metrics(state, ad.HostView(A, A, A), suspended=False)
    # Newlines reach no label: printable() escapes them, then the label escaping doubles the backslash.
    assert 'upstream_generation="x\\"\\\\\\\\x0a"' in text
    assert 'message="bad \\"quote\\"\\\\x0aline"' in text
    states = [ln for ln in text.splitlines() if ln.startswith("nixos_autodeploy_state{")]
    assert len(states) == len(ad.STATES) and sum(ln.endswith(" 1") for ln in states) == 1
    for name in ("dirty", "reboot_required", "info", "last_run_timestamp_seconds", "rollbacks_total"):
        assert f"# HELP nixos_autodeploy_{name} " in text and f"# TYPE nixos_autodeploy_{name} " in text


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "f"
    ad.atomic_write(str(p), "one\n")
    ad.atomic_write(str(p), "two\n")
    assert p.read_text() == "two\n" and [x.name for x in tmp_path.iterdir()] == ["f"]


# -- command line ----------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--once"], "--url"), (["--url", "http://x", "--switch-mode", "reboot"], "switch-mode"),
    (["--url", "http://x", "--reboot-mode", "now"], "reboot-mode"), (["--url", "http://x", "--timeout", "-1"], "timeout"),
    (["--url", "http://x", "--reboot-window", "25:00-26:00"], "reboot window"), (["--url", "http://x", "--bogus"], "--bogus"),
    (["status", "--jsn"], "--jsn"),
    (["--url", "http://x", "--json-field", "a.b", "--trusted-keys", "/dev/null"], "--json-field cannot"),
])
def test_bad_usage_exits_2_with_one_line(argv, needle):
    r = subprocess.run([sys.executable, str(AGENT), *argv], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr
    assert "Traceback" not in r.stderr


def test_help_explains_every_option():
    r = subprocess.run([sys.executable, str(AGENT), "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for opt in ("--url", "--once", "--switch-mode", "--reboot-mode", "--prometheus-path", "--state-dir", "--force",
                "--dry-run", "--timeout", "--interval", "--verbose", "--health-check", "--reboot-window",
                "--trusted-keys", "--token-file", "--json-field", "--on-success", "--on-failure"):
        assert opt in r.stdout


# -- strict metadata (a signed pointer means exactly what it says) -----------------------


@pytest.mark.parametrize("lines,needle", [
    ("revision: 1\nrevision: 2", "twice"),
    ("revision: 1\nRevision: 2", "lower-case ASCII"),
    ("revision: \uff11\uff12", "whole number"),             # fullwidth digits
    (f"revision: 1{'0' * 400}", "whole number"),
    (f"revision: {2**63}", "whole number"),
    ("revision: -1", "whole number"),
    ("revision: 1_000", "whole number"),
    ("host: web1", "unknown key 'host'"),                    # misspelled restriction
    ("not_after: 2030-01-01T00:00:00Z", "lower-case ASCII"),
    ("notafter: 2030-01-01T00:00:00Z", "unknown key"),
    ("h\u00f6sts: web1", "lower-case ASCII"),
    ("hosts: web1\x1b[2J", "control characters"),
    ("x-commit: abc\nx-commit: def", "twice"),
    ("\u3000revision: 5", "lower-case ASCII"),                # an ideographic space before the key
    ("revision\xa0: 5", "lower-case ASCII"),
    ("revision: 5\u2028hosts: *", "control characters"),     # not a line break here
    ("revision: 5\x1chosts: *", "control characters"),
    ("revision: 0005", "whole number"),
    ("revision: +5", "whole number"),
])
def test_metadata_is_strict(lines, needle):
    with pytest.raises(ad.PointerError) as exc:
        ad.parse_pointer(f"{A}\n{lines}\n".encode())
    assert needle in str(exc.value)
    assert str(exc.value).isprintable()


def test_metadata_known_keys_and_annotations():
    p = ad.parse_pointer(f"{A}\nrevision: {2**63 - 1}\nhosts: *\nnot-after: 2030-01-01T00:00:00Z\n"
                         "x-commit: 0123abc\n".encode())
    assert p.revision == 2**63 - 1 and p.metadata["hosts"] == "*" and p.metadata["x-commit"] == "0123abc"


@pytest.mark.parametrize("line,needle", [
    ('namespaces="git" ssh-ed25519 AAAAC3Nza', "starts with options"),
    ('cert-authority ssh-ed25519 AAAAC3Nza', "starts with options"),
    ('restrict ssh-ed25519 AAAAC3Nza', "starts with options"),
    ('verify-required ssh-ed25519 AAAAC3Nza', "starts with options"),
    ('no-touch-required ssh-ed25519 AAAAC3Nza', "starts with options"),
    ('ci@example', "no public key"),
])
def test_trusted_keys_lines_with_options_first_are_refused(tmp_path, line, needle):
    f = tmp_path / "keys"
    f.write_text(line + "\n")
    with pytest.raises(ad.UsageError) as exc:
        ad.allowed_signers(str(f))
    assert needle in str(exc.value)


def test_state_with_wrong_types_is_corrupt():
    for bad in ({"highest_revision": "5"}, {"highest_revision": True}, {"highest_revision": -1},
                {"rollbacks_total": None}, {"deployed": 5}, [], {"pointer": "x"},
                {"interrupted": {"/nix/store/x": "2"}}, {"last_error": {"message": 5}},
                {"intent": {"phase": "activate", "previous_profile": 5}}, {"intent": {"activated": "yes"}}):
        with pytest.raises(ad.StateError):
            ad.State.from_json(bad, "state.json")
    state = ad.State.from_json({"highest_revision": 5, "unknown_future_field": 1}, "state.json")
    assert state.highest_revision == 5
    assert json.loads(state.to_json())["unknown_future_field"] == 1  # kept on save


def test_loop_mode_writes_state_changes_at_once_and_timestamps_within_the_bound(tmp_path, monkeypatch):
    """Loop mode (hold_timestamps): a change that matters reaches state.json
    at once; one of only the run timestamps (and the pointer's fetched_at)
    waits at most TIMESTAMPS_WRITTEN_EVERY_SECONDS, or until flush() (the
    loop's end, a SIGTERM included); the next cycle reads it from memory."""
    clock = [1000.0]
    monkeypatch.setattr(ad.time, "monotonic", lambda: clock[0])
    state_dir = tmp_path / "state"
    store = ad.StateStore(str(state_dir))
    store.hold_timestamps = True
    on_disk = lambda: json.loads((state_dir / "state.json").read_text())  # noqa: E731

    def cycle(seconds: float, **changes) -> ad.State:
        clock[0] += seconds
        state = store.load()
        for name, value in changes.items():
            setattr(state, name, value)
        store.save(state)
        return state

    pointer = {"url": "u", "body": "/nix/store/x\n", "fetched_at": 1.0}
    cycle(0, last_run=1.0, last_state="up_to_date", pointer=pointer)
    assert on_disk()["last_run"] == 1.0  # the first save is written

    cycle(1, last_run=2.0, last_success=2.0, last_run_duration=0.1, pointer={**pointer, "fetched_at": 2.0})
    assert on_disk()["last_run"] == 1.0 and on_disk()["pointer"]["fetched_at"] == 1.0  # held
    assert store.load().last_run == 2.0 and store.load().pointer["fetched_at"] == 2.0  # ... and read back

    cycle(1, last_run=3.0, last_state="failed")  # matters: written at once, timestamps with it
    assert on_disk()["last_state"] == "failed" and on_disk()["last_run"] == 3.0
    cycle(1, last_run=4.0, pointer=None)
    assert on_disk()["pointer"] is None  # so does any other field
    cycle(1, last_run=5.0, history=[{"path": "/nix/store/x"}])
    assert on_disk()["history"] == [{"path": "/nix/store/x"}]

    cycle(ad.TIMESTAMPS_WRITTEN_EVERY_SECONDS - 0.5, last_run=6.0)
    assert on_disk()["last_run"] == 5.0
    cycle(1, last_run=7.0)  # the bound passed since the last write
    assert on_disk()["last_run"] == 7.0

    cycle(1, last_run=8.0)
    assert on_disk()["last_run"] == 7.0
    store.flush()  # the loop's end (SIGTERM, SIGINT)
    assert on_disk()["last_run"] == 8.0

    # While the loop sleeps (a poll interval of minutes), what is held is
    # written once the bound has passed, not at the next poll.
    cycle(1, last_run=8.5)
    store.flush_due()
    assert on_disk()["last_run"] == 8.0
    clock[0] += ad.TIMESTAMPS_WRITTEN_EVERY_SECONDS
    store.flush_due()
    assert on_disk()["last_run"] == 8.5

    # Someone else's state.json (an older agent, a restore) wins over what is held.
    cycle(1, last_run=9.0)
    (state_dir / "state.json").write_text(json.dumps({"last_run": 42.0, "deployed": "/nix/store/y"}))
    assert store.load().last_run == 42.0 and store.load().deployed == "/nix/store/y"
    store.flush()
    assert on_disk()["last_run"] == 42.0

    once = ad.StateStore(str(state_dir))  # --once: every save is written
    cycle_state = once.load()
    cycle_state.last_run = 50.0
    once.save(cycle_state)
    assert on_disk()["last_run"] == 50.0


@pytest.mark.parametrize("argv", [
    ["run", "--url", "http://x/p", "--once", "--prometheus-path", "/m.prom", "-s", "boot", "--health-check", "true"],
    ["status", "--json"], ["suspend", "--reason", "r"], ["resume"], ["trust-reset", "--min-revision", "3"],
    ["sign", "--key", "k", "--revision", "1", "--all-hosts", "-o", "out", "/nix/store/x"],
    ["check-boot", "--url", "http://x/p", "--wait", "0"],
    ["promote", "--pointer", "p", "--prometheus", "http://x", "--key", "k", "-o", "o", "--steps", "10,100"],
])
def test_the_sub_command_parser_alone_parses_as_the_whole_one(argv):
    """main() builds only the parser of the sub-command given (start-up)."""
    assert vars(ad.build_parser(argv[0]).parse_args(argv)) == vars(ad.build_parser().parse_args(argv))
    other = "status" if argv[0] != "status" else "run"
    with pytest.raises(ad.UsageError, match="invalid choice"):
        ad.build_parser(argv[0]).parse_args([other])


@pytest.mark.parametrize("name", ["example.org", "example.org.", "127.0.0.1", "::1", "a" * 63 + ".b", "a..b",
                                  ".a", "a" * 64, "a" * 64 + ".b", "b." + "a" * 64, "", "xn--bcher-kva.de",
                                  "b\u00fccher.de", "\u00e4" * 70])
def test_resolver_name_is_what_the_idna_codec_makes_of_the_name(name):
    """ASCII names skip the codec (start-up) with the same checks."""
    try:
        expected = name.encode("idna")
    except UnicodeError:
        expected = UnicodeError
    try:
        got = ad.resolver_name(name)
        got = got.encode("idna") if isinstance(got, str) else got  # what getaddrinfo() does with a str
    except UnicodeError:
        got = UnicodeError
    assert got == expected


def test_atomic_write_never_follows_a_planted_temp_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "out"
    for pid in range(os.getpid() - 5, os.getpid() + 5):
        os.symlink(victim, tmp_path / f".out.{pid}.tmp")
    ad.atomic_write(str(target), "new")
    assert victim.read_text() == "precious" and target.read_text() == "new" and not target.is_symlink()


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.write_text("old")
    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:3]))   # a short write
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ad.os, "write", short_then_full)
    with pytest.raises(OSError):
        ad.atomic_write(str(target), "x" * 100)
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert calls == [100, 97]  # the short write was continued, not ignored


@pytest.mark.parametrize("content", ["null", "[]", '{"last_run": NaN}', "[" * 100000 + "]" * 100000,
                                     '{"highest_revision": 5'])
def test_state_files_that_are_not_an_object_fail_closed(tmp_path, content):
    for name in ("state.json", "revision-floor"):
        d = tmp_path / name.replace(".", "-")
        d.mkdir(mode=0o700)
        (d / name).write_text(content)
        with pytest.raises(ad.StateError):
            ad.StateStore(str(d)).load()


def test_deeply_nested_json_pointer_is_refused():
    with pytest.raises(ad.PointerError):
        ad.parse_pointer(b"[" * 100000 + b"]" * 100000, "a.b")
    with pytest.raises(ad.PointerError):
        ad.parse_pointer(b'{"a": NaN}', "a")


# -- the decision and hold tables in the docstring and docs are the code's -----

def markdown_table(header, rows):
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def code_tables():
    nothing = (ad.Phase.DIRTY, ad.Phase.UNTRACKED)
    decision = markdown_table(("phase", "upstream", "steps, in order"), [
        (phase.value, upstream.value,
         ", ".join(k.value for k in kinds) if kinds or phase not in nothing else "nothing (dirty)")
        for (phase, upstream), kinds in ad.DECISION_TABLE.items()])
    holds = markdown_table(("hold", "blocks"), [
        (hold.value, "every step" if kinds == frozenset(ad.StepKind) else
         ", ".join(k.value for k in ad.StepKind if k in kinds)) for hold, kinds in ad.HOLD_TABLE.items()])
    return decision, holds


def test_docstring_and_docs_show_the_codes_tables():
    repo = Path(ad.__file__).parent
    readme = (repo / "README.md").read_text()
    lifecycle = (repo / "docs" / "design" / "lifecycle.md").read_text()
    doc = [line[4:] for line in ad.__doc__.splitlines()]
    decision, holds = ("\n".join(table) for table in code_tables())
    for text in (decision, holds):
        assert text in "\n".join(doc), "the docstring's table differs from the code's:\n" + text
        assert text in lifecycle, "docs/design/lifecycle.md's table differs from the code's:\n" + text
    assert decision in readme, "README's decision table differs from the code's:\n" + decision


def test_the_boot_loaders_facts_are_read_once_per_boot(monkeypatch):
    """Loop mode polls every few minutes; the Loader* variables (fetched
    from the firmware by efivarfs) and the boot parameters do not change
    within a boot: read once per boot ID."""
    reads = []
    monkeypatch.setattr(ad, "loader_boot_fingerprint", lambda: reads.append("fingerprint") or "t1 t2 e")
    monkeypatch.setattr(ad, "started_by_kexec", lambda: reads.append("kexec") or False)
    ad.boot_loader_facts.cache_clear()
    try:
        assert ad.boot_loader_facts("boot-1") == ("t1 t2 e", False)
        assert ad.boot_loader_facts("boot-1") == ("t1 t2 e", False)
        assert reads == ["fingerprint", "kexec"]
        ad.boot_loader_facts("boot-2")
        assert reads == ["fingerprint", "kexec"] * 2
    finally:
        ad.boot_loader_facts.cache_clear()
