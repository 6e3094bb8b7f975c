"""Where containerkitd's start-up time goes: imports (``-X importtime``) and the rest (cProfile).

Runs the real daemon (``python [-X importtime | -m cProfile -o F] .../containerkitd --root T/root ...``)
until it answers a Version call, stops it with SIGTERM, and prints

* importtime: the heaviest imports by cumulative time, and the import self-time the daemon pays
  beyond the Python floor (``import grpc``), attributed to the nearest repo module that pulled it in
  (so "core.loader: 40 ms" means core.loader and what it imports, that ``import grpc`` does not);
* cProfile: the functions with the most cumulative time during start (import machinery left out),
  and how often entry points were listed.

Both tools inflate what they measure (importtime by ~10-30 %, cProfile by ~1.5-2x on Python code):
read the numbers relative to each other; bench/startup.py gives the true wall clock.

    /work/venv-ck/bin/python bench/startup_profile.py [--top N] [--inherit-env]
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _daemons import CONTAINERKITD, PYTHON, cleanup, python_env, stop, wait_for_version

REPO_PACKAGES = ("core", "plugins")


def run_daemon(python_args: list[str], env: dict[str, str] | None) -> tuple[Path, float, str]:
    """Start containerkitd under ``python python_args``, wait for a Version answer, SIGTERM it.
    Returns (the temp dir, left in place for the caller's files, start ms, stderr text)."""
    tmp = Path(tempfile.mkdtemp(prefix="ckp-", dir="/tmp"))
    argv = [PYTHON, *python_args, CONTAINERKITD, "--root", f"{tmp}/root", "--state", f"{tmp}/state",
            "--address", f"{tmp}/ck.sock", "--log-level", "warning"]  # fmt: skip
    err_path = tmp / "stderr"
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=tmp, env=env)
        try:
            elapsed, _ = wait_for_version(tmp / "ck.sock", proc, t0)
        except BaseException:
            stop(proc)
            cleanup(tmp, [])
            raise
        stop(proc)
    return tmp, elapsed * 1000, err_path.read_text(errors="replace")


# ------------------------------------------------------------------------------------------ importtime


def parse_importtime(text: str) -> list[tuple[str, int, int, list[str]]]:
    """(module, self us, cumulative us, ancestors outermost first), in import order of completion."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), int(self_us), int(cum_us), depth))
    # The output is post-order (children before their parent): walk it backwards to find ancestors.
    out: list[tuple[str, int, int, list[str]]] = []
    stack: list[tuple[int, str]] = []
    for name, self_us, cum_us, depth in reversed(rows):
        while stack and stack[-1][0] >= depth:
            stack.pop()
        out.append((name, self_us, cum_us, [n for _, n in stack]))
        stack.append((depth, name))
    out.reverse()
    return out


def _is_repo(module: str) -> bool:
    return module.split(".", 1)[0] in REPO_PACKAGES


def report_importtime(daemon: str, floor: str, top: int) -> None:
    rows = parse_importtime(daemon)
    floor_modules = {name for name, *_ in parse_importtime(floor)}
    total = sum(cum for _, _, cum, anc in rows if not anc)
    floor_total = sum(cum for _, _, cum, anc in parse_importtime(floor) if not anc)
    print(f"imports: {len(rows)} modules, {total / 1000:.1f} ms (floor `import grpc`: "
          f"{len(floor_modules)} modules, {floor_total / 1000:.1f} ms)")  # fmt: skip

    print(f"\nheaviest imports by cumulative time (top {top}, nested ones included):")
    for name, self_us, cum_us, anc in sorted(rows, key=lambda r: -r[2])[:top]:
        via = f"  <- {anc[-1]}" if anc else ""
        print(f"  {cum_us / 1000:7.1f} ms  (self {self_us / 1000:5.1f})  {'  ' * min(len(anc), 3)}{name}{via}")

    by_owner: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name, self_us, _, anc in rows:
        if name in floor_modules:
            continue
        owner = next((m for m in reversed([*anc, name]) if _is_repo(m)), None)
        by_owner[owner or f"(outside the repo) {anc[0] if anc else name}"].append((self_us, name))
    extra = sum(us for items in by_owner.values() for us, _ in items)
    print(f"\nimport self-time beyond the floor: {extra / 1000:.1f} ms in "
          f"{sum(len(v) for v in by_owner.values())} modules, by the nearest repo module that imports it:")  # fmt: skip
    for owner, items in sorted(by_owner.items(), key=lambda kv: -sum(us for us, _ in kv[1]))[:top]:
        own = sum(us for us, _ in items)
        heavy = ", ".join(f"{n} {us / 1000:.1f}" for us, n in sorted(items, reverse=True)[:6] if n != owner)
        print(f"  {own / 1000:6.1f} ms  {owner:42s} {len(items):3d} modules  {heavy}")


# -------------------------------------------------------------------------------------------- cProfile


def report_cprofile(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    entries = []
    entry_point_calls = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        if filename.startswith("<frozen") or filename == "~":
            continue  # import machinery and builtins: importtime covers those
        if filename.endswith("threading.py") and func in ("wait", "_wait_for_tstate_lock", "join"):
            continue  # the daemon idling until SIGTERM
        if "importlib/metadata" in filename and func in ("entry_points", "distributions", "read_text"):
            entry_point_calls.append((f"{_short(filename)}:{line}({func})", ncalls, cumtime))
        entries.append((cumtime, tottime, ncalls, f"{_short(filename)}:{line}({func})"))
    print(f"\ncProfile of the main thread through start (top {top} by cumulative time, imports included):")
    for cumtime, tottime, ncalls, where in sorted(entries, reverse=True)[:top]:
        print(f"  {cumtime * 1000:7.1f} ms  (own {tottime * 1000:5.1f})  x{ncalls:<4d} {where}")
    stats.calc_callees()
    start = [k for k in stats.stats if k[0].endswith("core/daemon.py") and k[2] in ("_start", "start")]
    if start:
        root = max(start, key=lambda k: (k[2] == "_start", stats.stats[k][3]))
        print(f"\nbreakdown of {_short(root[0])}:{root[1]}({root[2]}), callees over 1 ms, two levels:")
        _print_callees(stats, root, depth=0, max_depth=2)
    print("entry-point listing:")
    for where, ncalls, cumtime in sorted(entry_point_calls):
        print(f"  {where} called {ncalls}x, {cumtime * 1000:.1f} ms in all")


def _label(key: tuple[str, int, str]) -> str:
    filename, line, func = key
    if filename.startswith("<frozen importlib") and func in ("_find_and_load", "_handle_fromlist"):
        return "(imports)"
    return func if filename == "~" else f"{_short(filename)}:{line}({func})"


def _print_callees(stats: pstats.Stats, key: tuple[str, int, str], depth: int, max_depth: int) -> None:
    callees = stats.all_callees.get(key, {})  # type: ignore[attr-defined]
    rows: dict[str, tuple[float, int, tuple[str, int, str]]] = {}
    for callee, value in callees.items():
        ncalls, cumtime = value[1], value[3]
        label = _label(callee)
        before = rows.get(label, (0.0, 0, callee))
        rows[label] = (before[0] + cumtime, before[1] + ncalls, callee)
    for label, (cumtime, ncalls, callee) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        if cumtime < 0.001:
            continue
        print(f"  {'    ' * depth}{cumtime * 1000:7.1f} ms  x{ncalls:<4d} {label}")
        if depth + 1 < max_depth and label != "(imports)":
            _print_callees(stats, callee, depth + 1, max_depth)


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return os.path.relpath(filename, Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=25, help="rows per list (default 25)")
    parser.add_argument("--inherit-env", action="store_true", help="do not cache bytecode (see startup.py)")
    args = parser.parse_args(argv)

    pycache = Path(tempfile.mkdtemp(prefix="ckb-pyc-", dir="/tmp"))
    env = python_env(args.inherit_env, pycache)
    try:
        for _ in range(2):  # fill the bytecode cache; the second start is the plain reference
            tmp, plain_ms, _ = run_daemon([], env)
            cleanup(tmp, [])
        floor = subprocess.run(
            [PYTHON, "-X", "importtime", "-c", "import grpc"], env=env, capture_output=True, text=True, cwd="/tmp"
        ).stderr
        print(f"containerkitd start -> first Version answer, uninstrumented: {plain_ms:.1f} ms\n")

        tmp, ms, stderr = run_daemon(["-X", "importtime"], env)
        cleanup(tmp, [])
        print(f"== -X importtime (start {ms:.1f} ms under it)")
        report_importtime(stderr, floor, args.top)

        prof_dir = Path(tempfile.mkdtemp(prefix="ckp-prof-", dir="/tmp"))
        try:
            tmp, ms, _ = run_daemon(["-m", "cProfile", "-o", str(prof_dir / "start.prof")], env)
            cleanup(tmp, [])
            print(f"\n== cProfile (start {ms:.1f} ms under it)")
            report_cprofile(prof_dir / "start.prof", args.top)
        finally:
            shutil.rmtree(prof_dir, ignore_errors=True)
    finally:
        shutil.rmtree(pycache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
