"""What the metadata-only cache of Secrets and ConfigMaps costs, with many Secrets in the cluster.

    .venv/bin/python benchmarks/metadata_watch.py [--secrets 10000,50000] [--namespaces 50] [--size 1024]

Starts the local control plane (watch cache on, as in a real cluster), then for each count in ``--secrets``
(cumulatively) creates that many Secrets of ``--size`` bytes of incompressible data, spread over
``--namespaces`` namespaces (``--in-flight`` concurrent creates over loopback), and runs a fresh process
that does nothing but sync a cluster-wide ``sources.MetadataCache`` of Secrets and ConfigMaps. From that
process's ``/proc/<pid>/status`` and ``/stat``: RSS after its imports (before any LIST), its peak RSS
(VmHWM), RSS once synced, the CPU seconds it spent, and the wall time from ``start()`` to ``synced``; then
the time from creating one more Secret to its ``on_change`` call (median and max of five). Prints a table and writes
``docs/benchmarks/metadata_watch.json``. A figure, not a pass/fail test: the memory target is for the whole
operator (≤ 150 MiB at 50,000 Secrets), of which this is the part that grows with the Secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from secured_endpoint import kube, sources
from secured_endpoint_devenv import controlplane

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "benchmarks" / "metadata_watch.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROBES = 5  # Secrets created after the sync, one at a time: create → on_change


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM in MiB, CPU seconds (user + system)."""
    figures: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            figures[line.split(":")[0]] = int(line.split()[1]) / 1024
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    figures["cpu"] = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
    return figures


# -- the measured process ----------------------------------------------------------------------------------


async def child(kubeconfig: str, page_size: int) -> dict[str, Any]:
    credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=kubeconfig)
    client = kube.KubeClient(credentials)
    probes: dict[str, asyncio.Event] = {}

    def on_change(kind: str, namespace: str, name: str, deleted: bool, fingerprint: str | None) -> None:
        if name in probes and not deleted:
            probes[name].set()

    cache = sources.MetadataCache(client, on_change=on_change, page_size=page_size)
    before = proc_status()
    started = time.monotonic()
    await cache.start()
    await cache.synced.wait()
    synced_after = time.monotonic() - started
    after = proc_status()
    counts = {"secrets_cached": cache.count(sources.SECRET), "configmaps_cached": cache.count(sources.CONFIGMAP)}
    latencies = []
    for number in range(PROBES):
        name = f"probe-{number}"
        probes[name] = asyncio.Event()
        created = time.monotonic()
        await client.create_secret("default", {"metadata": {"name": name}, "stringData": {"k": "v"}})
        await asyncio.wait_for(probes[name].wait(), 30)
        latencies.append((time.monotonic() - created) * 1000)
        await client.delete_secret("default", name)
    await cache.stop()
    await client.aclose()
    return {**counts, "rss_before_mib": round(before["VmRSS"], 1), "rss_synced_mib": round(after["VmRSS"], 1),
            "peak_rss_mib": round(after["VmHWM"], 1), "cpu_seconds": round(after["cpu"] - before["cpu"], 2),
            "start_to_synced_seconds": round(synced_after, 2),
            "create_to_on_change_ms": {"median": round(statistics.median(latencies), 1),
                                       "max": round(max(latencies), 1)},
            "lists": [watch.lists for watch in cache.watches]}


# -- the driver --------------------------------------------------------------------------------------------


async def create_secrets(plane: controlplane.ControlPlane, *, first: int, count: int, namespaces: int,
                         size: int, in_flight: int) -> float:
    """Create Secrets ``first`` … ``count - 1``, ``in_flight`` at once (a fixed pool of workers); seconds."""
    credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=str(plane.kubeconfig_path))
    client = kube.KubeClient(credentials, max_in_flight=in_flight)
    started = time.monotonic()
    try:
        for index in range(namespaces):
            try:
                await client.request("POST", "/api/v1/namespaces",
                                     json_body={"metadata": {"name": f"bulk-{index:03d}"}})
            except kube.KubeError as exc:
                if not exc.conflict:
                    raise
        numbers = iter(range(first, count))

        async def worker() -> None:
            for number in numbers:
                body = {"metadata": {"name": f"app-{number:06d}", "labels": {"app": f"app-{number % 97}"}},
                        "type": "Opaque", "data": kube.encode_data({"blob": os.urandom(size).hex()[:size]})}
                await client.create_secret(f"bulk-{number % namespaces:03d}", body)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    finally:
        await client.aclose()
    return time.monotonic() - started


def measure(plane: controlplane.ControlPlane, page_size: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    answer = subprocess.run([sys.executable, __file__, "--child", str(plane.kubeconfig_path),
                             "--page-size", str(page_size)], capture_output=True, text=True, env=env,
                            timeout=1800, check=False)
    if answer.returncode != 0:
        raise SystemExit(f"the measured process failed:\n{answer.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(answer.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--secrets", default="10000,50000", help="comma-separated counts, measured in turn")
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--size", type=int, default=1024, help="bytes of data per Secret")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent creates")
    parser.add_argument("--page-size", type=int, default=kube.LIST_PAGE_SIZE)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--child", metavar="KUBECONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.page_size))))
        return 0

    counts = sorted({int(text) for text in args.secrets.split(",") if text.strip()})
    controlplane.ensure_binaries()
    rows: list[dict[str, Any]] = []
    with controlplane.ControlPlane() as plane:
        created = 0
        for count in [0, *counts]:
            if count > created:
                print(f"creating Secrets {created:,} … {count:,} ({args.size} bytes each) …", flush=True)
                seconds = asyncio.run(create_secrets(plane, first=created, count=count, namespaces=args.namespaces,
                                                     size=args.size, in_flight=args.in_flight))
                print(f"  {count - created:,} created in {seconds:.0f} s ({(count - created) / seconds:.0f}/s)",
                      flush=True)
                created = count
            row = {"secrets": count, **measure(plane, args.page_size)}
            row["rss_growth_mib"] = round(row["rss_synced_mib"] - row["rss_before_mib"], 1)
            rows.append(row)
            print(f"  {count:,} Secrets: synced in {row['start_to_synced_seconds']} s, "
                  f"RSS {row['rss_before_mib']} → {row['rss_synced_mib']} MiB (peak {row['peak_rss_mib']})",
                  flush=True)

    header = (f"{'Secrets':>8} {'cached':>8} {'synced s':>9} {'CPU s':>6} {'RSS before':>10} {'RSS synced':>10} "
              f"{'peak RSS':>9} {'growth':>7} {'event ms':>9}")
    # event ms: create → on_change, median of the probes
    print()
    print(f"cluster-wide metadata cache of Secrets + ConfigMaps; {args.size}-byte Secrets over {args.namespaces} "
          f"namespaces; LIST pages of {args.page_size}; RSS in MiB")
    print(header)
    print("-" * len(header))
    for row in rows:
        event_ms = row["create_to_on_change_ms"]["median"]
        print(f"{row['secrets']:>8,} {row['secrets_cached']:>8,} {row['start_to_synced_seconds']:>9.2f} "
              f"{row['cpu_seconds']:>6.2f} {row['rss_before_mib']:>10.1f} {row['rss_synced_mib']:>10.1f} "
              f"{row['peak_rss_mib']:>9.1f} {row['rss_growth_mib']:>7.1f} {event_ms:>9.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "benchmarks/metadata_watch.py",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kubernetes": controlplane.kube_version(), "etcd": controlplane.etcd_version()},
        "parameters": {"size_bytes": args.size, "namespaces": args.namespaces, "page_size": args.page_size,
                       "in_flight_creates": args.in_flight},
        "results": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
