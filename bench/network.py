"""Network benchmark: attach + detach of one container, the bridge driver beside the CNI bridge plugin.

Both subjects do the same work on the same container netns, taking turns, ``--runs`` times each:

- **containerkit**: :class:`plugins.net_bridge.BridgeDriver` in-process, ``attach`` (veth pair into
  the netns as ``eth0``, MTU, an address from its sqlite-persisted allocator, up, default route via
  the gateway, loopback up) then ``detach`` (veth removed, address released);
- **cni**: ``/usr/lib/cni/bridge`` run directly, as a runtime runs it: the network config (``bridge``
  with ``isGateway``, ``host-local`` IPAM, a default route) on stdin and ``CNI_COMMAND=ADD`` / ``DEL``,
  ``CNI_NETNS``, ``CNI_IFNAME=eth0``, ``CNI_CONTAINERID``, ``CNI_PATH`` in the environment.

Each network (bridge with the gateway address) exists before the first run. The "host" side of both is
a private netns the benchmark makes and enters (its main thread only), so the bridges, and the IP
forwarding the CNI plugin turns on for ``isGateway``, never touch the real host; deleting that netns at
the end takes everything with it. The first ``--warmup`` runs are not counted. Must run as root.

    /work/venv-ck/bin/python bench/network.py [--runs 50] [--warmup 5] [--json]

Numbers only: nothing here asserts on timing. Target: containerkit no slower than CNI (ratio <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _daemons import print_columns, print_load, running_as_root
from pyroute2 import netns as pyroute2_netns

from core.netns import create_netns, delete_netns
from core.network import NetworkConfig
from plugins.net_bridge import BridgeDriver

CNI_BIN = Path("/usr/lib/cni")
SUBJECTS = ("containerkit", "cni")
METRICS = ("attach", "detach", "attach+detach")
TARGET_RATIO = 1.0
CONTAINER = "bench"


@contextmanager
def private_host() -> Iterator[None]:
    """Run the calling thread (and the processes it starts) in a fresh netns; delete it afterwards."""
    name = f"hnet-bench-host-{secrets.token_hex(3)}"
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pyroute2_netns.setns(create_netns(name))
        yield
    finally:
        pyroute2_netns.setns(own)
        os.close(own)
        delete_netns(name)


@dataclass
class Subject:
    """What one subject runs: attach the container, then detach it."""

    attach: Callable[[], object]
    detach: Callable[[], object]


def ours(root: Path, netns: str, stack: ExitStack) -> Subject:
    """attach and detach of the bridge driver on a network made up front (closed with ``stack``)."""
    driver = BridgeDriver(root)
    stack.callback(driver.close)
    network = driver.create(NetworkConfig("bench", "default", "10.250.0.0/24"))
    return Subject(lambda: driver.attach(network, CONTAINER, netns), lambda: driver.detach(network, CONTAINER, netns))


def cni(root: Path, netns: str) -> Subject:
    """CNI ADD and DEL of the bridge plugin with host-local IPAM; the bridge made by one ADD/DEL first."""
    config = {
        "cniVersion": "1.0.0",
        "name": "ckbench",
        "type": "bridge",
        "bridge": "cnibench0",
        "isGateway": True,
        "ipMasq": False,
        "mtu": 1500,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.250.1.0/24", "gateway": "10.250.1.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(root / "ipam"),
        },
    }
    stdin = json.dumps(config).encode()

    def call(command: str) -> Callable[[], None]:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": CONTAINER,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(CNI_BIN),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }

        def run() -> None:
            done = subprocess.run([str(CNI_BIN / "bridge")], input=stdin, env=env, capture_output=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"CNI bridge {command} failed: {done.stdout.decode()}{done.stderr.decode()}")

        return run

    subject = Subject(call("ADD"), call("DEL"))
    subject.attach()
    subject.detach()
    return subject


def measure(subjects: dict[str, Subject], runs: int, warmup: int) -> dict[str, Any]:
    """Per subject: the samples (ms) of each metric, their medians and minima."""
    samples: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METRICS} for s in subjects}
    for n in range(warmup + runs):
        order = list(subjects) if n % 2 == 0 else list(reversed(subjects))
        for subject in order:
            t0 = time.perf_counter()
            subjects[subject].attach()
            t1 = time.perf_counter()
            subjects[subject].detach()
            t2 = time.perf_counter()
            if n >= warmup:
                for metric, seconds in zip(METRICS, (t1 - t0, t2 - t1, t2 - t0), strict=True):
                    samples[subject][metric].append(seconds * 1000)
    return {
        subject: {
            "samples_ms": samples[subject],
            "median_ms": {m: statistics.median(v) for m, v in samples[subject].items()},
            "min_ms": {m: min(v) for m, v in samples[subject].items()},
        }
        for subject in subjects
    }


def print_table(results: dict[str, Any], runs: int) -> None:
    ck, other = results["containerkit"], results["cni"]
    rows = [("metric (ms)", "containerkit median (min)", "CNI bridge median (min)", "ratio ck/cni")]
    for metric in METRICS:
        a, b = ck["median_ms"][metric], other["median_ms"][metric]
        rows.append(
            (
                metric,
                f"{a:.2f} ({ck['min_ms'][metric]:.2f})",
                f"{b:.2f} ({other['min_ms'][metric]:.2f})",
                f"{a / b:.2f}x",
            )
        )
    print_columns(rows)
    ratio = ck["median_ms"]["attach+detach"] / other["median_ms"]["attach+detach"]
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    print(f"\n{runs} runs per subject; target ratio <= {TARGET_RATIO:.1f}: {verdict} ({ratio:.2f}x)")
    print_load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="measured attach+detach per subject (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured runs first (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON (every sample) instead of a table")
    args = parser.parse_args(argv)
    if not running_as_root("network.py"):
        return 2
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1, --warmup at least 0")
    if not (CNI_BIN / "bridge").exists():
        print(f"network.py: {CNI_BIN / 'bridge'} is missing (install containernetworking-plugins)", file=sys.stderr)
        return 2
    container = f"hnet-bench-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="ckb-network-") as tmp, private_host(), ExitStack() as stack:
        netns = create_netns(container)
        stack.callback(delete_netns, container)
        try:
            subjects = {"containerkit": ours(Path(tmp, "ours"), netns, stack), "cni": cni(Path(tmp, "cni"), netns)}
            results = measure(subjects, args.runs, args.warmup)
        except RuntimeError as err:
            print(f"network.py: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"runs": args.runs, "warmup": args.warmup, "results": results}, indent=2))
    else:
        print_table(results, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
