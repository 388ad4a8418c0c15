#!/usr/bin/env python3
"""Benchmark of the nixos-autodeploy agent, in the tests' isolated world.

    sudo bench/run.sh            # installs nix-bin and curl when missing, then runs this
    sudo python3 bench/bench.py  # the same, when the prerequisites are there

It reuses tests/world.py (one harness): real nix, a signed binary cache served
on 127.0.0.1 by ``PointerServer``, hosts isolated in ``unshare -m`` namespaces.
Everything lives in a temporary directory that is removed at the end.

The agent runs with Debian's /usr/bin/python3 (a clean interpreter, like the
python3 a NixOS host runs it with).  Processes are measured from *inside* the
host's namespace by a small measurer that starts them with posix_spawn and
collects them with wait4: wall time, CPU (user+sys of the process and the
children it waited for) and peak RSS.  The agent's *own* CPU and RSS (without
its children) come from a wrapper that runs autodeploy.py in-process with
runpy and reports getrusage(RUSAGE_SELF) at exit.

It prints numbers (medians of several repetitions) and a Markdown table for
docs/development/bench.md; it is not a pass/fail test, but it says which targets are missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import world as W  # noqa: E402  (tests/world.py: the one harness)

PY = "/usr/bin/python3"
AGENT = str(W.AGENT)
METRICS = W.METRICS
MIB = 1024 * 1024

# The agent as package.nix installs it: autodeploy.py as a module with
# bytecode compiled ahead of time, started by a three-line launcher.
LAUNCHER_CODE = """import sys
sys.path.insert(0, {libexec!r})
import autodeploy
sys.exit(autodeploy.main())
"""


def package_agent(root: Path, source: str | None = None) -> str:
    """autodeploy.py (or `source`, its text at another commit) as package.nix
    installs it; returns the launcher's path."""
    libexec = root / "libexec"
    libexec.mkdir(parents=True, exist_ok=True)
    if source is None:
        shutil.copy(AGENT, libexec / "autodeploy.py")
    else:
        (libexec / "autodeploy.py").write_text(source)
    launcher = libexec / "launcher.py"
    launcher.write_text(LAUNCHER_CODE.format(libexec=str(libexec)))
    subprocess.run([PY, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
                    str(libexec / "autodeploy.py")], check=True)
    return str(launcher)


LAUNCHER = ""  # set by main()
BEFORE = ""    # --before REF: the launcher of autodeploy.py at REF, measured side by side
PARTS = ("once", "loop", "deploy", "imports")

# What the agent is written with, imported by a bare interpreter: the floor
# a no-op `--once` is compared with (issue 21: at most 1.25x of it).
IMPORTS_FLOOR = "import urllib.request, argparse, json, dataclasses"

# Targets from the issue.
TARGET_ONCE_RATIO = 1.0        # no-op --once CPU <= 1.0x the original tool's per-poll work
TARGET_ONCE_IMPORTS = 1.25     # no-op --once CPU <= 1.25x the interpreter importing IMPORTS_FLOOR
TARGET_POLL_CPU = 0.001        # loop-mode no-op poll <= 1 ms CPU
TARGET_DEPLOY_SHARE = 0.02     # agent's own CPU <= 2% of a 1,000-path deploy
TARGET_RSS_KIB = 25 * 1024     # peak RSS <= 25 MiB

# Runs inside the host namespace: runs each variant's steps (argv lists, in
# sequence, no shell) with posix_spawn, waits with wait4, prints JSON results.
MEASURER = r'''
import json, os, sys, time
spec = json.loads(sys.argv[1])
log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
names = list(spec["variants"])

def measure(name, variant):
    report = variant.get("report")
    env = dict(os.environ)
    if report:
        env["BENCH_REPORT"] = report
        try:
            os.unlink(report)
        except FileNotFoundError:
            pass
    user = system = 0.0
    rss = 0
    start = time.perf_counter()
    for argv in variant["steps"]:
        os.write(log, ("\n### %s: %s\n" % (name, " ".join(argv))).encode())
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)])
        _, status, ru = os.wait4(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        user += ru.ru_utime
        system += ru.ru_stime
        rss = max(rss, ru.ru_maxrss)
        if code != 0:
            return {"error": "%s exited with %d" % (argv[0], code)}
    wall = time.perf_counter() - start
    out = {"wall": wall, "cpu": user + system, "user": user, "sys": system, "maxrss_kib": rss}
    if report:
        with open(report) as f:
            out["self"] = json.load(f)
    return out

results = []
for rep in range(-spec["warmup"], spec["reps"]):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:  # rotate: no variant always goes first
        r = measure(name, spec["variants"][name])
        r.update(variant=name, rep=rep)
        if "error" in r or rep >= 0:
            results.append(r)
        if "error" in r:
            print(json.dumps(results))
            sys.exit(1)
print(json.dumps(results))
'''

# Runs autodeploy.py in-process (python3 -c WRAPPER autodeploy.py ARGS...) and
# writes, at exit, the agent process's own rusage (RUSAGE_SELF excludes
# children) and its children's (RUSAGE_CHILDREN) to $BENCH_REPORT.
WRAPPER = r'''
import atexit, os, resource, sys
def _report():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    import json
    with open(os.environ["BENCH_REPORT"], "w") as f:
        json.dump({"cpu": s.ru_utime + s.ru_stime, "user": s.ru_utime, "sys": s.ru_stime,
                   "maxrss_kib": s.ru_maxrss, "children_cpu": c.ru_utime + c.ru_stime,
                   "children_maxrss_kib": c.ru_maxrss, "ssl": "ssl" in sys.modules,
                   "modules": len(sys.modules)}, f)
atexit.register(_report)
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def measure(host: W.Host, variants: dict[str, dict], reps: int, warmup: int, logfile: Path) -> dict[str, list[dict]]:
    """Run the measurer in the host's namespace; results grouped by variant."""
    spec = {"variants": variants, "reps": reps, "warmup": warmup, "log": str(logfile)}
    r = W.in_namespace(host.binds, [PY, "-c", MEASURER, json.dumps(spec)], env=host.env,
                       capture_output=True, text=True)
    try:
        results = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"measurer failed ({r.returncode}):\n{r.stdout}\n{r.stderr}") from None
    bad = [x for x in results if "error" in x]
    if bad or r.returncode != 0:
        tail = logfile.read_text()[-3000:] if logfile.exists() else ""
        raise SystemExit(f"a measured command failed: {bad}\n--- log tail ---\n{tail}\n{r.stderr}")
    grouped: dict[str, list[dict]] = {name: [] for name in variants}
    for x in results:
        grouped[x["variant"]].append(x)
    return grouped


def instrument(server: W.PointerServer, nodelay: bool = True) -> list[tuple[str, int, int, int]]:
    """Record (path, status, header bytes, body bytes) of every response the
    server sends: what the agent receives at the HTTP level.

    With `nodelay`, the server's sockets get TCP_NODELAY, as real servers'
    have (nginx: tcp_nodelay on): the handler writes headers and body in two
    writes, and without it Nagle's algorithm holds the body until the client's
    delayed ACK (40 ms) -- a stall per response that is the harness's, not
    the agent's or nix's."""
    base = server.httpd.RequestHandlerClass
    wire: list[tuple[str, int, int, int]] = []

    class Counting(base):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            super().setup()
            if nodelay:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw, handler = self.wfile, self

            class Writer:
                def write(self, data: bytes) -> int:
                    handler._sent += len(data)
                    return raw.write(data)

                def __getattr__(self, name: str):
                    return getattr(raw, name)

            self.wfile = Writer()

        def handle_one_request(self) -> None:
            self._sent, self._head, self._status = 0, None, None
            super().handle_one_request()
            if self._status is not None:
                head = self._head if self._head is not None else self._sent
                wire.append((self.path, self._status, head, self._sent - head))

        def send_response(self, code: int, message: str | None = None) -> None:
            self._status = code
            super().send_response(code, message)

        def end_headers(self) -> None:
            super().end_headers()
            self._head = self._sent

    server.httpd.RequestHandlerClass = Counting
    return wire


def proc_cpu(pid: int) -> tuple[float, float, float]:
    """(own utime, own stime, waited-for children's cutime+cstime) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    # fields[0] is the state (field 3); utime is field 14.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime / tick, stime / tick, (cutime + cstime) / tick


def proc_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def machine_facts() -> dict[str, str]:
    facts: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo").read_text()
    m = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    facts["cpu"] = m.group(1).strip() if m else platform.processor() or "unknown"
    facts["nproc"] = str(os.cpu_count())
    m = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
    facts["memory"] = f"{int(m.group(1)) / 1024 / 1024:.1f} GiB" if m else "unknown"
    try:
        osr = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        facts["os"] = osr.get("PRETTY_NAME", "").strip('"')
    except OSError:
        facts["os"] = "unknown"
    facts["kernel"] = platform.release()
    virt = shutil.which("systemd-detect-virt")
    if virt:
        facts["virtualization"] = subprocess.run([virt], capture_output=True, text=True).stdout.strip() or "none"
    facts["python"] = subprocess.run([PY, "-c", "import sys; print(sys.version.split()[0])"],
                                     capture_output=True, text=True).stdout.strip() + f" ({PY})"
    facts["nix"] = subprocess.run(["nix-store", "--version"], capture_output=True, text=True).stdout.strip()
    facts["curl"] = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    facts["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return facts


# ---------------------------------------------------------------------------
# The parts of the benchmark
# ---------------------------------------------------------------------------


def bench_once(root: Path, world: W.World, server: W.PointerServer, reps: int) -> dict:
    """1. One no-op --once cycle as a whole process, against the floor and the
    original tool's per-poll work, side by side (interleaved) in one run."""
    host = W.Host(root / "once", world, server, python=PY)
    a = world.path("a")
    host.install(a)
    url = server.pointer(a, path="/once")
    first = host.once(url)  # start tracking: later cycles are no-ops
    if first.returncode != 0:
        raise SystemExit(f"agent failed on the first cycle ({first.returncode}):\n{first.stderr}")
    report = str(root / "once-report.json")
    agent_args = ["--once", "--url", url, "--prometheus-path", METRICS]
    variants = {
        "agent": {"steps": [[PY, LAUNCHER, *agent_args]]},
        "agent (as a script)": {"steps": [[PY, AGENT, *agent_args]]},
        "agent (runpy wrapper)": {"steps": [[PY, "-c", WRAPPER, LAUNCHER, *agent_args]], "report": report},
        "floor": {"steps": [["curl", "-fsS", url], ["readlink", "/run/current-system"]]},
        "original": {"steps": [
            ["curl", "-fsS", url],
            ["nix-store", "--realise", a, "--add-root", "/run/upstream-system"],
            ["readlink", "-f", "/run/current-system", "/run/booted-system", "/nix/var/nix/profiles/system",
             "/run/upstream-system"]]},
        "python3 -c pass": {"steps": [[PY, "-c", "pass"]]},
        "imports floor": {"steps": [[PY, "-c", IMPORTS_FLOOR]]},
        "/bin/true": {"steps": [["/bin/true"]]},
    }
    if BEFORE:
        variants["agent (before)"] = {"steps": [[PY, BEFORE, *agent_args]]}
    grouped = measure(host, variants, reps, warmup=2, logfile=root / "once.log")
    state = host.state().get("last_state")
    out = {}
    for name, rows in grouped.items():
        out[name] = {k: med([r[k] for r in rows]) for k in ("wall", "cpu", "user", "sys", "maxrss_kib")}
        if rows and "self" in rows[0]:
            out[name]["self_cpu"] = med([r["self"]["cpu"] for r in rows])
            out[name]["self_maxrss_kib"] = med([r["self"]["maxrss_kib"] for r in rows])
            out[name]["children_cpu"] = med([r["self"]["children_cpu"] for r in rows])
            out[name]["ssl"] = any(r["self"]["ssl"] for r in rows)
            out[name]["modules"] = med([r["self"]["modules"] for r in rows])
    out["_state"] = state
    return out


def bench_loop(root: Path, world: W.World, server: W.PointerServer, wire: list, polls: int, reps: int) -> dict:
    """2. Loop mode: CPU per no-op poll over `polls` polls, with and without
    conditional requests; bytes received per poll."""
    a = world.path("a")
    results: dict[str, dict] = {}
    agents = {"": LAUNCHER, **({" (before)": BEFORE} if BEFORE else {})}
    for etag in (False, True):
        runs_of: dict[str, list[dict]] = {name: [] for name in agents}
        for rep in range(reps):
            # Alternating, one run of each agent per repetition (their order
            # rotates): both see the same machine load.
            names = list(agents)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                tag = f"{int(etag)}-{rep}-{list(agents).index(name)}"
                host = W.Host(root / f"loop-{tag}", world, server, python=PY)
                host.install(a)
                path = f"/loop-{tag}"
                url = server.pointer(a, path=path, etag=etag)
                first = host.once(url)  # tracking; the loop then only polls
                if first.returncode != 0:
                    raise SystemExit(f"agent failed ({first.returncode}):\n{first.stderr}")
                runs_of[name].append(loop_once(host, server, wire, path, url, polls, agents[name]))
                shutil.rmtree(host.root, ignore_errors=True)
        for name, runs in runs_of.items():
            label = ("304 (ETag, If-None-Match)" if etag else "200 (no ETag)") + name
            results[label] = summarize_loop(runs)
    return results


def summarize_loop(runs: list[dict]) -> dict:
    return {
        "cpu_per_poll": med([r["cpu_per_poll"] for r in runs]),
        "cpu_range": (min(r["cpu_per_poll"] for r in runs), max(r["cpu_per_poll"] for r in runs)),
        "sys_per_poll": med([r["sys_per_poll"] for r in runs]),
        "children_cpu": max(r["children_cpu"] for r in runs),
        "hwm_kib": med([r["hwm_kib"] for r in runs]),
        "statuses": sorted({s for r in runs for s in r["statuses"]}),
        "head_bytes": med([r["head_bytes"] for r in runs]),
        "body_bytes": med([r["body_bytes"] for r in runs]),
        "polls_per_s": med([r["polls_per_s"] for r in runs]),
        "runs": runs,
    }


def loop_once(host: W.Host, server: W.PointerServer, wire: list, path: str, url: str, polls: int,
              launcher: str) -> dict:
    warm = 10

    def count() -> int:
        return sum(1 for r in server.requests if r["path"] == path)

    script = " && ".join(f'mount --bind "{src}" {dst}' for dst, src in host.binds.items())
    log = open(host.root / "loop.log", "w")
    # Not Host.agent_background: its stderr pipe is never read while it runs
    # and would fill up (the agent logs every cycle); a file does not.
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script + ' && exec "$@"', "sh",
         PY, launcher, "--url", url, "--interval", "0.01", "--prometheus-path", METRICS],
        env=host.env, stdout=log, stderr=log)
    try:
        def wait_for(n: int) -> None:
            deadline = time.monotonic() + 120
            while count() < n:
                if proc.poll() is not None:
                    raise SystemExit(f"loop agent exited ({proc.returncode}):\n"
                                     + (host.root / "loop.log").read_text()[-2000:])
                if time.monotonic() > deadline:
                    raise SystemExit("loop agent too slow")
                time.sleep(0.0005)

        wait_for(warm)
        c1, t1 = count(), time.monotonic()
        user1, sys1, _ = proc_cpu(proc.pid)
        wait_for(c1 + polls)
        c2, t2 = count(), time.monotonic()
        user2, sys2, children = proc_cpu(proc.pid)
        hwm = proc_hwm_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    mine = [w for w in wire if w[0] == path][c1:c2]
    return {
        "cpu_per_poll": (user2 + sys2 - user1 - sys1) / (c2 - c1),
        "sys_per_poll": (sys2 - sys1) / (c2 - c1),
        "children_cpu": children,
        "hwm_kib": hwm,
        "statuses": sorted({w[1] for w in mine}),
        "head_bytes": med([w[2] for w in mine]),
        "body_bytes": med([w[3] for w in mine]),
        "max_body_bytes": max((w[3] for w in mine), default=0),
        "polls_per_s": (c2 - c1) / (t2 - t1),
    }


def bench_deploy(root: Path, world: W.World, server: W.PointerServer, reps: int) -> dict:
    """3./4. A deploy of a system with a 1,000-path closure from the loopback
    cache: wall, the agent's own CPU and its share, peak RSS; next to a bare
    `nix-store --realise` of the same closure on an equally fresh host."""
    a, big = world.path("a"), world.path("big")
    rows, bare = [], []
    closure = None
    for rep in range(reps):
        # The agent's deploy: a fresh host that runs `a` and tracks it.
        host = W.Host(root / f"deploy-{rep}", world, server, python=PY)
        host.install(a)
        path = f"/deploy-{rep}"
        url = server.pointer(a, path=path)
        first = host.once(url)
        if first.returncode != 0:
            raise SystemExit(f"agent failed ({first.returncode}):\n{first.stderr}")
        server.pointer(big, path=path)
        report = str(root / f"deploy-{rep}.json")
        g = measure(host, {"deploy": {"steps": [[PY, "-c", WRAPPER, LAUNCHER, "--once", "--url", url,
                                                  "--prometheus-path", METRICS]], "report": report}},
                    reps=1, warmup=0, logfile=root / f"deploy-{rep}.log")
        if host.current != big:
            raise SystemExit(f"the deploy did not switch to {big}: current is {host.current}")
        rows.append(g["deploy"][0])
        if closure is None:
            closure = len(host.sh(f"nix-store -qR {big}").stdout.split())
        # The bare realise, for reference.
        ref = W.Host(root / f"bare-{rep}", world, server, python=PY)
        ref.install(a)
        g = measure(ref, {"realise": {"steps": [["nix-store", "--realise", big, "--add-root",
                                                  "/run/upstream-system"]]}},
                    reps=1, warmup=0, logfile=root / f"bare-{rep}.log")
        bare.append(g["realise"][0])
        shutil.rmtree(host.root, ignore_errors=True)
        shutil.rmtree(ref.root, ignore_errors=True)
    share = [r["self"]["cpu"] / (r["self"]["cpu"] + r["self"]["children_cpu"]) for r in rows]
    return {
        "closure": closure,
        "wall": med([r["wall"] for r in rows]),
        "whole_cpu": med([r["self"]["cpu"] + r["self"]["children_cpu"] for r in rows]),
        "self_cpu": med([r["self"]["cpu"] for r in rows]),
        "share": med(share),
        "self_maxrss_kib": med([r["self"]["maxrss_kib"] for r in rows]),
        "children_maxrss_kib": med([r["self"]["children_maxrss_kib"] for r in rows]),
        "bare_wall": med([r["wall"] for r in bare]),
        "bare_cpu": med([r["cpu"] for r in bare]),
    }


IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def bench_imports(root: Path, world: W.World, server: W.PointerServer, reps: int) -> dict:
    """Start-up imports (-X importtime) of `status --json` and a no-op cycle."""
    host = W.Host(root / "imports", world, server, python=PY)
    a = world.path("a")
    host.install(a)
    url = server.pointer(a, path="/imports")
    host.once(url)
    out: dict = {}
    code = ("import sys, time; src = open(sys.argv[1]).read(); t = time.process_time()\n"
            "for _ in range(20): compile(src, sys.argv[1], 'exec')\n"
            "print((time.process_time() - t) / 20)")
    out["_compile_s"] = float(subprocess.run([PY, "-c", code, AGENT], capture_output=True, text=True,
                                             check=True).stdout)
    base = []
    for _ in range(reps):
        r = subprocess.run([PY, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
        base.append(sum(int(m.group(2)) for m in map(IMPORT_LINE.match, r.stderr.splitlines())
                        if m and len(m.group(3)) // 2 == 0))
    out["_startup_imports_us"] = med(base)
    for label, args in (("status --json", ["status", "--json"]),
                        ("no-op --once (http://)", ["--once", "--url", url, "--prometheus-path", METRICS])):
        totals, per_module, modules = [], {}, set()
        for _ in range(reps):
            r = W.in_namespace(host.binds, [PY, "-X", "importtime", AGENT, *args], env=host.env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{label} failed ({r.returncode}):\n{r.stderr[-2000:]}")
            total = 0
            for line in r.stderr.splitlines():
                m = IMPORT_LINE.match(line)
                if not m:
                    continue
                cumulative, depth, name = int(m.group(2)), len(m.group(3)) // 2, m.group(4)
                modules.add(name)
                if depth == 0:
                    total += cumulative
                    per_module.setdefault(name, []).append(cumulative)
            totals.append(total)
        top = sorted(((med(v), k) for k, v in per_module.items()), reverse=True)[:8]
        out[label] = {"total_us": med(totals), "top": top, "count": len(modules),
                      "ssl": "ssl" in modules, "http.client": "http.client" in modules,
                      "urllib.request": "urllib.request" in modules}
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def verdict(ok: bool, miss: str) -> str:
    return "met" if ok else f"**missed**: {miss}"


def report(facts: dict, once: dict | None, loop: dict | None, deploy: dict | None, imports: dict | None,
           args: argparse.Namespace) -> None:
    say("\n## Machine")
    for k, v in facts.items():
        if k != "before":
            say(f"- {k}: {v}")
    if args.before:
        say(f"- before: autodeploy.py at `{args.before}` ({facts.get('before', '?')}), measured side by side")
    targets: list[str] = []

    if once is not None:
        ag, fl, orig, wr, py, imp_floor = (once[k] for k in ("agent", "floor", "original", "agent (runpy wrapper)",
                                                             "python3 -c pass", "imports floor"))
        say(f"\n## 1. One no-op `--once` cycle as a whole process (median of {args.reps}, interleaved; "
            f"agent state after the runs: {once['_state']})\n")
        say("| | wall | CPU (user+sys) | peak RSS |")
        say("|---|---:|---:|---:|")
        rows = [("agent", "agent `--once` (no-op), as packaged (launcher + precompiled module)")]
        if "agent (before)" in once:
            rows.append(("agent (before)", f"agent `--once` (no-op), as packaged, at `{args.before}`"))
        rows += [("agent (as a script)", "agent `--once` (no-op), `python3 autodeploy.py`"),
                 ("floor", "floor: `curl` pointer + `readlink /run/current-system`"),
                 ("original", "original per poll: `curl` + `nix-store --realise --add-root` + `readlink -f` links"),
                 ("python3 -c pass", "`/usr/bin/python3 -c pass` (interpreter start-up)"),
                 ("imports floor", f"`/usr/bin/python3 -c '{IMPORTS_FLOOR}'`")]
        for name, label in rows:
            x = once[name]
            say(f"| {label} | {ms(x['wall'])} | {ms(x['cpu'])} | {mib(x['maxrss_kib'])} |")
        say("| **agent / original** | "
            f"**{ag['wall'] / orig['wall']:.2f}x** | **{ag['cpu'] / orig['cpu']:.2f}x** | "
            f"**{ag['maxrss_kib'] / orig['maxrss_kib']:.2f}x** |")
        say(f"| **agent / imports floor** | **{ag['wall'] / imp_floor['wall']:.2f}x** | "
            f"**{ag['cpu'] / imp_floor['cpu']:.2f}x** | **{ag['maxrss_kib'] / imp_floor['maxrss_kib']:.2f}x** |")
        if "agent (before)" in once:
            bf = once["agent (before)"]
            say(f"| agent at `{args.before}` / imports floor | {bf['wall'] / imp_floor['wall']:.2f}x | "
                f"{bf['cpu'] / imp_floor['cpu']:.2f}x | {bf['maxrss_kib'] / imp_floor['maxrss_kib']:.2f}x |")
        say(f"| agent / floor | {ag['wall'] / fl['wall']:.2f}x | {ag['cpu'] / fl['cpu']:.2f}x | "
            f"{ag['maxrss_kib'] / fl['maxrss_kib']:.2f}x |")
        say(f"\nPeak RSS is ru_maxrss from wait4; a child started with posix_spawn inherits the measurer's "
            f"high-water mark, so values at or below {mib(once['/bin/true']['maxrss_kib'])} (what `/bin/true` "
            f"shows) are that floor, not the command's own.")
        say(f"\nAgent's own peak RSS (packaged, runpy wrapper, RUSAGE_SELF): {mib(wr['self_maxrss_kib'])}; "
            f"its own CPU there: {ms(wr['self_cpu'])}; children CPU: {ms(wr['children_cpu'])} "
            f"(a no-op cycle spawns {'nothing' if wr['children_cpu'] == 0 else 'something'}); "
            f"ssl imported: {'yes' if wr['ssl'] else 'no'}; modules loaded: {wr['modules']:.0f}.")
        ratio = ag["cpu"] / orig["cpu"]
        targets.append(
            f"| no-op `--once` CPU <= {TARGET_ONCE_RATIO:.1f}x the original tool's per-poll work | {ratio:.2f}x "
            f"({ms(ag['cpu'])} vs {ms(orig['cpu'])}) | "
            + verdict(ratio <= TARGET_ONCE_RATIO, f"by {ratio - TARGET_ONCE_RATIO:.2f}x "
                      f"({ms(ag['cpu'] - orig['cpu'] * TARGET_ONCE_RATIO)} over)") + " |")
        ratio = ag["cpu"] / imp_floor["cpu"]
        before = (f"; at `{args.before}`: {once['agent (before)']['cpu'] / imp_floor['cpu']:.2f}x "
                  f"({ms(once['agent (before)']['cpu'])})" if "agent (before)" in once else "")
        targets.append(
            f"| no-op `--once` CPU, as packaged, <= {TARGET_ONCE_IMPORTS:.2f}x the interpreter importing what the "
            f"agent is written with | {ratio:.2f}x ({ms(ag['cpu'])} vs {ms(imp_floor['cpu'])}){before} | "
            + verdict(ratio <= TARGET_ONCE_IMPORTS, f"by {ratio - TARGET_ONCE_IMPORTS:.2f}x "
                      f"({ms(ag['cpu'] - imp_floor['cpu'] * TARGET_ONCE_IMPORTS)} over)") + " |")

    if loop is not None:
        say(f"\n## 2. Loop mode (`--interval 0.01`), CPU per no-op poll over {args.polls} polls "
            f"(median of {args.loop_reps} runs{', alternating with the agent at ' + repr(args.before) if args.before else ''})\n")
        say("| responses | CPU per poll (min-max of runs) | of which sys | header bytes / poll | body bytes / poll "
            "| polls/s | peak RSS (VmHWM) |")
        say("|---|---:|---:|---:|---:|---:|---:|")
        for label, x in loop.items():
            lo, hi = x["cpu_range"]
            say(f"| {label} (statuses seen: {', '.join(map(str, x['statuses']))}) | {x['cpu_per_poll'] * 1000:.2f} ms "
                f"({lo * 1000:.2f}-{hi * 1000:.2f}) | {x['sys_per_poll'] * 1000:.2f} ms | "
                f"{x['head_bytes']:.0f} | {x['body_bytes']:.0f} | {x['polls_per_s']:.0f} | {mib(x['hwm_kib'])} |")
        children = max(x["children_cpu"] for x in loop.values())
        say(f"\nCPU from /proc/<pid>/stat (utime+stime, {os.sysconf('SC_CLK_TCK')} Hz ticks) between poll 10 and "
            f"poll {10 + args.polls}; children's CPU in loop mode: {ms(children)}.")
        polls = {label: x["cpu_per_poll"] for label, x in loop.items() if "(before)" not in label}
        worst_poll = max(polls.values())
        before = [f"{label}: {x['cpu_per_poll'] * 1000:.2f} ms" for label, x in loop.items() if "(before)" in label]
        targets.append(
            f"| loop-mode no-op poll <= {ms(TARGET_POLL_CPU)} CPU | "
            + ", ".join(f"{label}: {v * 1000:.2f} ms" for label, v in polls.items())
            + (f" ({', '.join(before)})" if before else "") + " | "
            + verdict(worst_poll <= TARGET_POLL_CPU, f"by {(worst_poll - TARGET_POLL_CPU) * 1000:.2f} ms") + " |")
        etag_row = loop["304 (ETag, If-None-Match)"]
        no_body = etag_row["statuses"] == [304] and all(r["max_body_bytes"] == 0 for r in etag_row["runs"])
        targets.append(
            f"| 304 polls receive no body | statuses {etag_row['statuses']}, body bytes per poll "
            f"{etag_row['body_bytes']:.0f} (max {max(r['max_body_bytes'] for r in etag_row['runs'])}) | "
            + verdict(no_body, "bodies or non-304 answers seen") + " |")

    if deploy is not None:
        say(f"\n## 3./4. Deploy of a system with a {deploy['closure']}-path closure from the loopback cache "
            f"(median of {args.deploy_reps}, each on a fresh host)\n")
        say("| | value |")
        say("|---|---:|")
        say(f"| total wall (agent `--once`: fetch, realise, activate, health check) | {deploy['wall']:.2f} s |")
        say(f"| whole CPU (agent + children) | {deploy['whole_cpu'] * 1000:.0f} ms |")
        say(f"| agent's own CPU (RUSAGE_SELF) | {ms(deploy['self_cpu'])} |")
        say(f"| **agent's share of the deploy's CPU** | **{deploy['share'] * 100:.2f} %** |")
        say(f"| agent's own peak RSS | {mib(deploy['self_maxrss_kib'])} |")
        say(f"| largest child's peak RSS (nix-store) | {mib(deploy['children_maxrss_kib'])} |")
        say(f"| reference: bare `nix-store --realise` of the same closure, fresh host: wall / CPU | "
            f"{deploy['bare_wall']:.2f} s / {deploy['bare_cpu'] * 1000:.0f} ms |")
        targets.append(
            f"| agent's own CPU <= {TARGET_DEPLOY_SHARE * 100:.0f}% of a 1,000-path deploy | "
            f"{deploy['share'] * 100:.2f} % | "
            + verdict(deploy["share"] <= TARGET_DEPLOY_SHARE,
                      f"by {(deploy['share'] - TARGET_DEPLOY_SHARE) * 100:.2f} points") + " |")

    if imports is not None:
        say(f"\n## Start-up imports (`/usr/bin/python3 -X importtime autodeploy.py ...`, median of "
            f"{args.import_reps})\n")
        compile_s = imports.pop("_compile_s")
        startup_imports = imports.pop("_startup_imports_us") / 1e6
        say("| command | import time (sum of top-level cumulative) | modules | ssl | http.client "
            "| top-level modules by cumulative time |")
        say("|---|---:|---:|---|---|---|")
        for label, x in imports.items():
            top = ", ".join(f"{name} {us / 1000:.1f}" for us, name in x["top"])
            say(f"| `{label}` | {x['total_us'] / 1000:.1f} ms | {x['count']} | {'yes' if x['ssl'] else 'no'} | "
                f"{'yes' if x['http.client'] else 'no'} | {top} (ms) |")
        if once is not None:
            # Why: where a no-op cycle's CPU goes (import times are wall, measured with -X importtime).
            noop = imports["no-op --once (http://)"]
            top = dict((name, us / 1e6) for us, name in noop["top"])
            imp = noop["total_us"] / 1e6 - startup_imports
            say("\n## Where the no-op `--once` CPU goes (estimates)\n")
            say(f"- interpreter start-up (`python3 -c pass`): {ms(py['cpu'])}")
            say(f"- compiling autodeploy.py ({Path(AGENT).stat().st_size // 1024} KiB): {ms(compile_s)} on every "
                f"start when run as a script (`python3 autodeploy.py` gets no cached bytecode); 0 as packaged "
                f"(as script: {ms(once['agent (as a script)']['cpu'])} CPU in all)")
            say(f"- the agent's imports (`-X importtime`, wall, less the {ms(startup_imports)} that "
                f"`python3 -c pass` imports too): {ms(imp)}"
                + (f"; http.client alone {ms(top['http.client'])} (it imports ssl and the email package "
                   f"at module level, so ssl is loaded even for http://)" if "http.client" in top else ""))
            rest = ag["cpu"] - py["cpu"] - imp
            say(f"- the rest (module body: classes, enums, dataclasses; argument parsing; the cycle itself: "
                f"HTTP, readlinks, state and metrics written): {ms(max(rest, 0.0))}")
            if deploy is not None:
                say(f"- a {deploy['closure']}-path deploy costs the agent {ms(deploy['self_cpu'])} of its own CPU, "
                    f"{ms(deploy['self_cpu'] - wr['self_cpu'])} more than a no-op cycle: the share is mostly the "
                    f"fixed start-up cost; 2% of this deploy would be "
                    f"{ms(deploy['whole_cpu'] * TARGET_DEPLOY_SHARE)}")

    if once is not None and loop is not None and deploy is not None:
        rss = {"no-op --once (packaged)": once["agent"]["maxrss_kib"],
               "no-op --once (as a script)": once["agent (as a script)"]["maxrss_kib"],
               **{f"loop {k.split()[0]}": v["hwm_kib"] for k, v in loop.items() if "(before)" not in k},
               "deploy, own (packaged, runpy)": deploy["self_maxrss_kib"]}
        worst_rss_name = max(rss, key=rss.get)
        targets.append(
            f"| peak RSS <= {mib(TARGET_RSS_KIB)} | "
            + ", ".join(f"{k}: {mib(v)}" for k, v in rss.items()) + " | "
            + verdict(rss[worst_rss_name] <= TARGET_RSS_KIB,
                      f"{worst_rss_name} by {mib(rss[worst_rss_name] - TARGET_RSS_KIB)}") + " |")

    say("\n## Targets\n")
    say("| target | result | verdict |")
    say("|---|---|---|")
    for row in targets:
        say(row)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="repetitions of the no-op --once comparison (default 15)")
    p.add_argument("--polls", type=int, default=300, help="polls measured in loop mode (default 300)")
    p.add_argument("--loop-reps", type=int, default=3, help="loop-mode runs per variant (default 3)")
    p.add_argument("--deploy-reps", type=int, default=5, help="1,000-path deploys (default 5)")
    p.add_argument("--import-reps", type=int, default=5, help="-X importtime runs (default 5)")
    p.add_argument("--deps", type=int, default=998,
                   help="extra closure paths of the big system (default 998: closure of 1,000 paths)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    p.add_argument("--before", metavar="REF",
                   help="also measure autodeploy.py as it is at git REF (e.g. main), side by side: "
                        "interleaved with the working tree's in the --once comparison, alternating in loop mode")
    args = p.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts: a comma-separated list of {', '.join(PARTS)}")
    before_source = None
    if args.before:
        r = subprocess.run(["git", "-C", str(REPO), "show", f"{args.before}:autodeploy.py"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            p.error(f"--before: {r.stderr.strip()}")
        before_source = r.stdout

    why = W.missing_prerequisites()
    if why:
        say(f"cannot run: {why}")
        return 2
    for tool in ("curl", PY):
        if shutil.which(tool) is None:
            say(f"cannot run: needs {tool} (Debian: apt-get install curl python3)")
            return 2

    root = Path(tempfile.mkdtemp(prefix="autodeploy-bench-"))
    server = None
    try:
        facts = machine_facts()
        say(f"building the test world in {root} (stand-in systems"
            + (f", {args.deps} extra paths" if "deploy" in parts else "") + ", signed cache) ...")
        t = time.monotonic()
        systems: dict[str, dict] = {"a": {}, **({"big": {"deps": args.deps}} if "deploy" in parts else {})}
        world = W.build_world(root / "world", systems)
        say(f"  built in {time.monotonic() - t:.1f} s")
        global LAUNCHER, BEFORE
        LAUNCHER = package_agent(root / "package")
        if before_source is not None:
            BEFORE = package_agent(root / "package-before", before_source)
            facts["before"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before],
                                             capture_output=True, text=True).stdout.strip()
        facts["agent"] = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                        capture_output=True, text=True).stdout.strip()
        server = W.PointerServer(world.cache)
        wire = instrument(server)

        once = loop = deploy = imports = None
        if "once" in parts:
            say(f"1. no-op --once vs floor vs original tool, {args.reps} interleaved repetitions ...")
            once = bench_once(root, world, server, args.reps)
        if "loop" in parts:
            say(f"2. loop mode, {args.polls} polls x {args.loop_reps} runs, with and without ETag ...")
            loop = bench_loop(root, world, server, wire, args.polls, args.loop_reps)
        if "deploy" in parts:
            say(f"3. deploys of the {args.deps + 2}-path closure, {args.deploy_reps} fresh hosts ...")
            deploy = bench_deploy(root, world, server, args.deploy_reps)
        if "imports" in parts:
            say("start-up imports ...")
            imports = bench_imports(root, world, server, args.import_reps)
        report(facts, once, loop, deploy, imports, args)
    finally:
        if server is not None:
            server.close()
        if args.keep:
            say(f"\n(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
