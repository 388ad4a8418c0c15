"""The docs cannot drift: each test compares a page of docs/ with the code it
describes, in both directions where the page lists things (nothing missing,
nothing stale).

- the command line (docs/reference/cli.md) against build_parser(),
- the metrics (docs/reference/metrics.md) against render_metrics(),
- status fields, state.json fields and exit codes (docs/reference/state.md)
  against status_fields(), State and the exit codes the code can return,
- the module options (docs/reference/module-options.md) against a fresh
  regeneration from module.nix, and the option-to-flag table of
  docs/how-to/nixos-module.md against that list,
- the alerts (docs/reference/alerts.md) against contrib/alerts.yml: their
  names, `for:` and severity,
- the dry-run example of docs/design/lifecycle.md against the plan the agent
  renders for it,
- every path of this repository that README.md and docs/ name (tests/,
  examples/, contrib/, bench/, docs/) against the files there,
- every relative link of README.md and docs/ against the files and headings
  it points to.

The parsers of the pages are small functions taking text, so the tests can
show that a changed page or changed code fails them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO))

import autodeploy as ad  # noqa: E402


def read(rel: str) -> str:
    return (REPO / rel).read_text()


def section_tables(text: str, heading: str) -> str:
    """The text of the section whose `## ` heading is `heading`, up to the next `## `."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"no section '## {heading}'"
    return m.group(1)


def first_cells(text: str) -> list[str]:
    """The first cell of every Markdown table row (header and rule rows excluded)."""
    cells = []
    for line in text.splitlines():
        if not line.startswith("|") or re.match(r"^\|[-| :]+\|$", line):
            continue
        cell = re.split(r"(?<!\\)\|", line)[1].strip()
        cells.append(cell)
    return cells[1:] if cells else cells  # the header row


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ---------------------------------------------------------------------------
# Command line


def parser_options() -> dict[str, set[str]]:
    """Sub-command -> its option strings, from the real parser (without -h/--help)."""
    parser = ad.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in sp._actions for s in a.option_strings if s not in ("-h", "--help")}
            for name, sp in sub.choices.items()}


def documented_options(text: str) -> list[tuple[list[str], set[str]]]:
    """(commands, options in the first column of the section's table) per
    section: a `## ` heading naming commands in backticks (`suspend` and
    `resume` share one)."""
    out = []
    for m in re.finditer(r"^## ([^\n]*)\n(.*?)(?=^## |\Z)", text, re.S | re.M):
        commands = [c for c in code_spans(m.group(1)) if c in ad.COMMANDS]
        if commands:
            out.append((commands, {span.split()[0] for cell in first_cells(m.group(2))
                                   for span in code_spans(cell) if span.startswith("-")}))
    return out


def cli_drift(parsed: dict[str, set[str]], text: str) -> list[str]:
    sections = documented_options(text)
    problems = [f"cli.md documents a command the parser lacks: {c}"
                for commands, _ in sections for c in commands if c not in parsed]
    for command in sorted(parsed):
        mine = [(commands, options) for commands, options in sections if command in commands]
        if not mine:
            problems.append(f"cli.md has no section for `{command}`")
            continue
        shown = set().union(*(options for _, options in mine))
        # a shared section shows the union of its commands' options
        allowed = set().union(*(parsed.get(c, set()) for commands, _ in mine for c in commands))
        problems += [f"`{command} {o}` is not in cli.md" for o in sorted(parsed[command] - shown)]
        problems += [f"cli.md shows `{o}` under `{command}`, which the parser lacks"
                     for o in sorted(shown - allowed)]
    return problems


def test_cli_reference_has_every_option_and_no_other():
    assert cli_drift(parser_options(), read("docs/reference/cli.md")) == []
    assert "--version" in read("docs/reference/cli.md")


def test_cli_drift_fails_when_either_side_changes():
    text = read("docs/reference/cli.md")
    parsed = parser_options()
    parsed["run"] = parsed["run"] | {"--new-option"}
    assert cli_drift(parsed, text) == ["`run --new-option` is not in cli.md"]
    stale = text.replace("| `--hook-timeout SECONDS` |", "| `--hook-timeout SECONDS` |\n| `--gone` | x |")
    assert cli_drift(parser_options(), stale) == ["cli.md shows `--gone` under `run`, which the parser lacks"]
    missing = text.replace("| `--wait SECONDS` |", "| wait |")
    assert cli_drift(parser_options(), missing) == ["`check-boot --wait` is not in cli.md"]


# ---------------------------------------------------------------------------
# Metrics


def metric_names_in_code(source: str) -> set[str]:
    """The names render_metrics() passes to its `metric(...)` helper."""
    tree = ast.parse(source)
    render = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "render_metrics")
    names = set()
    for call in ast.walk(render):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "metric":
            first = call.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                f"a metric name that is not a literal (line {call.lineno}): the docs test cannot see it"
            names.add("nixos_autodeploy_" + first.value)
    return names


def every_metric_rendered() -> set[str]:
    """Render with every optional part present: the names the agent can write."""
    state = ad.State(
        upstream_revision=7, highest_revision=7, last_run_success=False,
        last_error={"kind": "fetch", "message": "m"}, boot_free_bytes=1, boot_needed_bytes=2,
        rollout={"bucket": 1, "percent": 5.0, "paused": False, "turn_at": 1.0},
        prefetched={"path": "/nix/store/x", "time": 1.0}, prefetch_error={"path": "p", "message": "m", "time": 1.0},
        fleetlock_failures={"pre-reboot:slot_busy": 1}, fleetlock_error={"operation": "pre-reboot", "kind": "k"},
        reboot_slot={"group": "default", "granted": True})
    text = ad.render_metrics(state, ad.HostView(None, None, None), suspended=False)
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def documented_metrics(text: str) -> set[str]:
    return {re.sub(r"\{.*", "", span) for cell in first_cells(text) for span in code_spans(cell)
            if span.startswith("nixos_autodeploy_")}


def test_metric_names_come_from_the_code():
    """The source scan and a full rendering agree, so neither misses a name."""
    assert metric_names_in_code(read("autodeploy.py")) == every_metric_rendered()


def test_metrics_reference_has_every_metric_and_no_other():
    code = metric_names_in_code(read("autodeploy.py"))
    documented = documented_metrics(read("docs/reference/metrics.md"))
    assert sorted(code - documented) == [], "metrics the agent writes that metrics.md lacks"
    assert sorted(documented - code) == [], "metrics.md lists metrics the agent does not write"


def test_metrics_drift_fails_when_either_side_changes():
    source = read("autodeploy.py").replace(
        '    metric("dirty", "gauge",', '    metric("brand_new", "gauge", "x", [])\n    metric("dirty", "gauge",', 1)
    assert metric_names_in_code(source) - documented_metrics(read("docs/reference/metrics.md")) == {
        "nixos_autodeploy_brand_new"}
    doc = "\n".join(line for line in read("docs/reference/metrics.md").splitlines()
                    if not line.startswith("| `nixos_autodeploy_suspended`"))
    assert metric_names_in_code(read("autodeploy.py")) - documented_metrics(doc) == {"nixos_autodeploy_suspended"}


# ---------------------------------------------------------------------------
# Status fields, state files, exit codes


def status_fields_in_code(source: str) -> set[str]:
    tree = ast.parse(source)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "status_fields")
    ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
    assert isinstance(ret.value, ast.Dict)
    return {k.value for k in ret.value.keys if isinstance(k, ast.Constant)}


def documented_status_fields(text: str) -> set[str]:
    table = section_tables(text, "`status`")
    return {span for cell in first_cells(table) for span in code_spans(cell)}


def exit_codes_in_code(module) -> set[int]:
    """Every code a command can exit with: the error classes' codes, promote's
    verdicts and what main() returns itself."""
    codes = {cls.exit_code for cls in vars(module).values()
             if inspect.isclass(cls) and issubclass(cls, module.AutodeployError)}
    codes |= set(module.PROMOTE_EXIT.values())
    main = next(n for n in ast.walk(ast.parse(inspect.getsource(module.main))) if isinstance(n, ast.FunctionDef))
    codes |= {n.value.value for n in ast.walk(main)
              if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, int)}
    return codes


def documented_exit_codes(text: str) -> set[int]:
    return {int(cell) for cell in first_cells(section_tables(text, "Exit codes")) if cell.isdigit()}


def test_status_reference_has_every_field_and_no_other():
    code = status_fields_in_code(read("autodeploy.py"))
    documented = documented_status_fields(read("docs/reference/state.md"))
    assert sorted(code - documented) == [], "status --json fields that state.md lacks"
    assert sorted(documented - code) == [], "state.md lists status fields the agent does not print"


def test_state_reference_names_every_state_field():
    text = section_tables(read("docs/reference/state.md"), "State files")
    missing = [f.name for f in dataclasses.fields(ad.State)
               if f.metadata.get("stored", True) and f"`{f.name}`" not in text]
    assert missing == [], "state.json fields that state.md's State files section does not name"


def test_exit_codes_reference_is_the_codes():
    assert exit_codes_in_code(ad) == documented_exit_codes(read("docs/reference/state.md"))


def test_state_drift_fails_when_either_side_changes():
    text = read("docs/reference/state.md")
    source = read("autodeploy.py").replace('"version": VERSION,', '"version": VERSION, "new_field": 1,', 1)
    assert status_fields_in_code(source) - documented_status_fields(text) == {"new_field"}
    no_row = "\n".join(line for line in text.splitlines() if not line.startswith("| `reboot_slot` |"))
    assert status_fields_in_code(read("autodeploy.py")) - documented_status_fields(no_row) == {"reboot_slot"}
    no_code = "\n".join(line for line in text.splitlines() if not line.startswith("| 7 |"))
    assert exit_codes_in_code(ad) - documented_exit_codes(no_code) == {7}

    @dataclasses.dataclass
    class Extra(ad.State):
        brand_new_field: int = 0
    section = section_tables(text, "State files")
    assert [f.name for f in dataclasses.fields(Extra)
            if f.metadata.get("stored", True) and f"`{f.name}`" not in section] == ["brand_new_field"]


# ---------------------------------------------------------------------------
# Module options


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_module_options", DOCS / "gen_module_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


def evaluation_missing() -> str | None:
    if shutil.which("nix-instantiate") is None:
        return "nix-instantiate not found (Debian: apt-get install nix-bin)"
    if not (GEN.nixpkgs_lib() / "default.nix").is_file():
        return f"no nixpkgs lib/ at {GEN.nixpkgs_lib()}: set NIXPKGS_LIB to a nixpkgs lib/ directory"
    return None


def need_evaluation():
    reason = evaluation_missing()
    if reason and (os.environ.get("CI") == "true" or os.environ.get("NIXOS_AUTODEPLOY_REQUIRE_EVAL") == "1"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def module_options():
    need_evaluation()
    return GEN.options(GEN.nixpkgs_lib())


def test_module_options_page_is_current(module_options):
    assert GEN.render(module_options) == read("docs/reference/module-options.md"), \
        "docs/reference/module-options.md is stale: run python3 docs/gen_module_options.py"


def test_module_options_page_fails_when_the_module_changes(module_options):
    changed = [dict(o) for o in module_options]
    changed[0]["description"] += " A new sentence."
    assert GEN.render(changed) != read("docs/reference/module-options.md")
    added = [*module_options, {**module_options[0], "name": "system.autoDeploy.brandNew"}]
    assert "## system.autoDeploy.brandNew" in GEN.render(added)


def flag_table_options(text: str) -> set[str]:
    table = section_tables(text, "Which option becomes which flag")
    return {"system.autoDeploy." + span for cell in first_cells(table) for span in code_spans(cell)}


def test_option_to_flag_table_has_every_option_and_no_other(module_options):
    names = {o["name"] for o in module_options}
    assert flag_table_options(read("docs/how-to/nixos-module.md")) == names


# ---------------------------------------------------------------------------
# Alerts


def alerts_in_rules(text: str) -> set[str]:
    return set(re.findall(r"^\s*- alert:\s*(\S+)\s*$", text, re.M))


def documented_alerts(text: str) -> set[str]:
    return {span for cell in first_cells(text) for span in code_spans(cell) if span.startswith("NixosAutodeploy")}


def test_alerts_reference_describes_every_alert_and_no_other():
    rules = alerts_in_rules(read("contrib/alerts.yml"))
    assert len(rules) >= 10
    assert rules == documented_alerts(read("docs/reference/alerts.md"))


def test_alerts_drift_fails_when_either_side_changes():
    rules = read("contrib/alerts.yml") + "\n      - alert: NixosAutodeployBrandNew\n"
    assert alerts_in_rules(rules) - documented_alerts(read("docs/reference/alerts.md")) == {"NixosAutodeployBrandNew"}
    doc = "\n".join(line for line in read("docs/reference/alerts.md").splitlines()
                    if not line.startswith("| `NixosAutodeployDirty`"))
    assert alerts_in_rules(read("contrib/alerts.yml")) - documented_alerts(doc) == {"NixosAutodeployDirty"}


def alert_settings_in_rules(text: str) -> dict[str, tuple[str, str]]:
    """Alert -> (its `for:`, or "–" without one; its severity label)."""
    out: dict[str, tuple[str, str]] = {}
    for block in re.split(r"^\s*- alert:", text, flags=re.M)[1:]:
        name = block.split()[0]
        wait = re.search(r"^\s*for:\s*(\S+)\s*$", block, re.M)
        severity = re.search(r"^\s*severity:\s*(\S+)\s*$", block, re.M)
        out[name] = (wait.group(1) if wait else "–", severity.group(1) if severity else "")
    return out


def documented_alert_settings(text: str) -> dict[str, tuple[str, str]]:
    """Alert -> (the `for` column, the Severity column) of the alerts table."""
    out = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`NixosAutodeploy"):
            out[cells[0].strip("`")] = (cells[2], cells[3])
    return out


def test_alerts_reference_has_each_alerts_for_and_severity():
    rules = alert_settings_in_rules(read("contrib/alerts.yml"))
    assert len(rules) >= 10 and all(severity for _, severity in rules.values())
    assert documented_alert_settings(read("docs/reference/alerts.md")) == rules


def test_alert_settings_drift_fails_when_either_side_changes():
    rules, doc = read("contrib/alerts.yml"), read("docs/reference/alerts.md")
    changed = re.sub(r"(- alert: NixosAutodeployDirty\n(?:.*\n)*?\s*for: )6h", r"\g<1>2h", rules, count=1)
    assert changed != rules
    assert alert_settings_in_rules(changed)["NixosAutodeployDirty"] == ("2h", "warning")
    assert alert_settings_in_rules(changed) != documented_alert_settings(doc)
    changed_doc = doc.replace("| 24h | info |", "| 24h | warning |", 1)
    assert changed_doc != doc and alert_settings_in_rules(rules) != documented_alert_settings(changed_doc)


# ---------------------------------------------------------------------------
# Examples of output


def rendered_dry_run_example() -> list[str]:
    """The plan the Lifecycle page's dry-run example shows: a settled host, a
    new upstream whose wave has not come (bucket 4040, rollout 10 %), no
    --reboot-mode, no FleetLock; rendered by the agent's own plan()."""
    upstream = "/nix/store/" + "a" * 32 + "-nixos-system-web-26.05"
    rollout = {"start_percent": 10.0, "start": None, "duration": None, "paused": False, "bucket": 4040}
    where = ad.describe_rollout(rollout, 0.0)
    holds = {ad.Hold.WAVE: f"not deploying {ad.basename_or_empty(upstream)} yet: {where}",
             ad.Hold.REBOOT_MODE: "no --reboot-mode: the reboot is left to an operator"}
    host = ad.HostView(*[None] * len(dataclasses.fields(ad.HostView)))
    plan = ad.plan(ad.Phase.SETTLED, ad.Upstream.NEW, ad.State(), host, upstream, force=False,
                   fleetlock=False, mode="switch", holds=holds)
    lines = plan.render() + [f"rollout: {where}"]
    return [line.replace("/nix/store/" + "a" * 32, "/nix/store/...").replace("a" * 32, "...")
            for line in lines]


def documented_dry_run_example(text: str) -> list[str]:
    section = section_tables(text, "Dry run")
    return [line[4:] for line in section.splitlines() if line.startswith("    ")]


def test_lifecycle_dry_run_example_is_what_the_agent_prints():
    assert documented_dry_run_example(read("docs/design/lifecycle.md")) == rendered_dry_run_example()


def test_dry_run_example_drift_fails_when_the_page_changes():
    doc = read("docs/design/lifecycle.md")
    without_prefetch = re.sub(r"^    1\. prefetch .*\n", "", doc, flags=re.M)
    assert without_prefetch != doc
    assert documented_dry_run_example(without_prefetch) != rendered_dry_run_example()


# ---------------------------------------------------------------------------
# Files named in the docs

# Paths of this repository as the pages name them (in text, code spans and
# code blocks); a placeholder such as tests/test_X.py is not a file.
REPO_PATH = re.compile(r"(?<![\w/.-])((?:tests|examples|contrib|bench|docs)/[\w./-]*\w)")
PLACEHOLDERS = {"tests/test_X.py"}


def missing_repo_paths(pages: dict[Path, str]) -> list[str]:
    missing = []
    for page, text in pages.items():
        for path in sorted(set(REPO_PATH.findall(text)) - PLACEHOLDERS):
            if not (REPO / path).exists():
                missing.append(f"{page.relative_to(REPO)}: {path}")
    return missing


def test_files_named_in_the_docs_exist():
    assert missing_repo_paths(doc_pages()) == []


def test_named_files_fail_when_a_file_is_renamed():
    pages = doc_pages()
    readme = REPO / "README.md"
    pages[readme] = pages[readme] + "\nSee `tests/test_renamed_away.py`.\n"
    assert missing_repo_paths(pages) == ["README.md: tests/test_renamed_away.py"]


# ---------------------------------------------------------------------------
# Links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    out, fence = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        m = re.match(r"#{1,6} (.*)", line)
        if m and not fence:
            out.add(slug(m.group(1)))
    return out


def broken_links(pages: dict[Path, str]) -> list[str]:
    broken = []
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and dest.suffix == ".md":
                text_of = pages.get(dest) or dest.read_text()
                if anchor not in anchors(text_of):
                    broken.append(f"{page.relative_to(REPO)}: {target}: no such heading")
    return broken


def doc_pages() -> dict[Path, str]:
    return {p: p.read_text() for p in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]}


def test_links_between_pages_resolve():
    assert broken_links(doc_pages()) == []


def test_links_fail_when_a_heading_moves():
    pages = doc_pages()
    state = DOCS / "reference" / "state.md"
    pages[state] = pages[state].replace("## Exit codes", "## Exit statuses")
    assert "README.md: docs/reference/state.md#exit-codes: no such heading" in broken_links(pages)


def test_readme_reaches_every_reference_page_in_one_click():
    readme = read("README.md")
    for page in sorted((DOCS / "reference").glob("*.md")):
        assert f"](docs/reference/{page.name})" in readme, f"README does not link {page.name}"
    for anchor in ("status", "state-files", "exit-codes"):
        assert f"](docs/reference/state.md#{anchor})" in readme
