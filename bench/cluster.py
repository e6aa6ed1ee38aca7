"""Local cluster figures (issue 3): devcluster up/down, pod latency and API server throughput.

    .venv/bin/python bench/cluster.py [--dir DIR] [--quick]

- warm `devcluster up` (binaries built), twice, with a timed `down` in between;
- bound pod (spec.nodeName preset) create -> Running seen by a watch: one at a time, then a burst;
- raw pod create throughput with 8 concurrent clients, pods bound to a node that does not exist
  (nothing schedules or runs them): the API server + etcd limit every later figure is compared with;
- scheduler path: pods without nodeName, create -> bound -> Running, 8 concurrent clients.

Pods run `sleep` (a host process on the node agent) and have no ServiceAccount token, as job pods.
"""

from __future__ import annotations

import re
import sys
import time

from common import (
    Context,
    Figure,
    Kube,
    LoadSpan,
    Obj,
    Section,
    Tracker,
    Watch,
    latency_summary,
    ms,
    parallel_create,
    percentile,
    proc_cpu_seconds,
    secs,
    suffix,
    wait_for,
)

KEY = "cluster"
TITLE = "Local cluster (`bench/cluster.py`)"
NODE = "cpu-0"
NO_SUCH_NODE = "bench-no-such-node"
CLIENTS = 8


def pod_body(name: str, *, node: str | None, labels: dict[str, str] | None = None) -> Obj:
    spec: Obj = {
        "containers": [{"name": "c", "image": "bench", "command": ["sleep", "3600"]}],
        "restartPolicy": "Never",
        # SIGTERM ends `sleep` at once; a short grace keeps deletions from lingering if it did not.
        "terminationGracePeriodSeconds": 1,
        # Job pods run without a token; a projected token would add a TokenRequest per pod.
        "automountServiceAccountToken": False,
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }


def _wait_no_pods(kube: Kube, ns: str, timeout: float = 180) -> None:
    wait_for(
        f"pods in {ns} gone", lambda: not kube.get(f"/api/v1/namespaces/{ns}/pods")["items"], timeout, 0.5
    )


def _up_breakdown(stderr: str) -> str:
    steps = re.findall(r"devcluster: (.+?) (?:ready|Ready) in ([\d.]+)s", stderr)
    return ", ".join(f"{what} {t} s" for what, t in steps if not what.startswith("cluster"))


def bench_up_down(ctx: Context, sec: Section) -> None:
    c = ctx.cluster
    if c.running():
        c.down()  # untimed: we want a cycle that starts from nothing
    ups, downs, notes = [], [], ""
    load = LoadSpan()
    for i in range(2):
        r = c.up()
        ups.append(r.seconds)
        if i == 0:
            notes = _up_breakdown(r.stderr)
        if i == 0:
            downs.append(c.down().seconds)
    load.stop()
    sec.add(
        Figure(
            "`devcluster up`, warm (binaries built), 2 runs",
            " / ".join(secs(u) for u in ups),
            "< 20 s",
            str(load),
            f"first run: {notes}" if notes else "",
            ok=max(ups) < 20,
        )
    )
    sec.add(
        Figure("`devcluster down`", secs(downs[0]), "", str(load), "SIGTERM to every recorded process group")
    )


def bench_bound_sequential(ctx: Context, sec: Section, kube: Kube, ns: str, tracker: Tracker) -> None:
    n = ctx.n(200, 20)
    path = f"/api/v1/namespaces/{ns}/pods"
    lat: list[float] = []
    load = LoadSpan()
    for i in range(n):
        name = f"seq-{i}"
        kube.post(path, pod_body(name, node=NODE))
        t_created = time.monotonic()
        tracker.wait("running", [name], 60)
        lat.append(tracker.seen["running"][name] - t_created)
        # Deleting keeps the node at one or two live pods: this is the latency of an idle node.
        kube.delete(f"{path}/{name}")
    load.stop()
    sec.add(
        Figure(
            f"bound pod create → Running (watch), one at a time, {n} pods",
            latency_summary(lat),
            "p50 < 300 ms",
            str(load),
            "from the create response to the watch event with phase Running",
            ok=percentile(lat, 50) < 0.3,
        )
    )
    _wait_no_pods(kube, ns)


def bench_bound_burst(ctx: Context, sec: Section, kube: Kube, ns: str, tracker: Tracker) -> None:
    n = ctx.n(100, 16)
    path = f"/api/v1/namespaces/{ns}/pods"
    bodies = [pod_body(f"burst-{i}", node=NODE, labels={"bench": "burst"}) for i in range(n)]
    load = LoadSpan()
    b = parallel_create(kube, path, bodies, CLIENTS)
    tracker.wait("running", b.created, 300)
    load.stop()
    lat = [tracker.seen["running"][k] - t for k, t in b.created.items()]
    all_running = max(tracker.seen["running"][k] for k in b.created) - b.t0
    sec.add(
        Figure(
            f"bound pods, burst of {n} from {CLIENTS} clients: create → Running",
            latency_summary(lat),
            "",
            str(load),
            f"all {n} Running {secs(all_running)} after the first create",
        )
    )
    kube.delete(f"{path}?labelSelector=bench%3Dburst")
    _wait_no_pods(kube, ns)


def bench_create_throughput(ctx: Context, sec: Section, kube: Kube) -> None:
    n = ctx.n(2000, 200)
    ns = f"bench-raw-{suffix()}"
    kube.create_namespace(ns)
    path = f"/api/v1/namespaces/{ns}/pods"
    bodies = [pod_body(f"raw-{i}", node=NO_SUCH_NODE) for i in range(n)]
    api_pid, etcd_pid = ctx.cluster.pid_of("kube-apiserver"), ctx.cluster.pid_of("etcd")
    cpu0 = (proc_cpu_seconds(api_pid), proc_cpu_seconds(etcd_pid), time.process_time())
    load = LoadSpan()
    b = parallel_create(kube, path, bodies, CLIENTS)
    load.stop()
    wall = b.wall
    cpu = (
        proc_cpu_seconds(api_pid) - cpu0[0],
        proc_cpu_seconds(etcd_pid) - cpu0[1],
        time.process_time() - cpu0[2],
    )
    rate = n / wall
    sec.add(
        Figure(
            f"raw pod create throughput, {CLIENTS} clients, {n} pods bound to a missing node",
            f"{rate:.0f} pods/s ({secs(wall)})",
            "",
            str(load),
            f"per create request p50 {ms(percentile(b.request, 50))}, p99 {ms(percentile(b.request, 99))}. "
            f"CPU during the run: apiserver {cpu[0]:.1f} s, etcd {cpu[1]:.1f} s, this client {cpu[2]:.1f} s "
            f"(of {2 * wall:.1f} s on 2 cores); nothing schedules or runs these pods",
        )
    )
    ctx.shared["raw_create_pods_per_s"] = rate
    # Force-delete: no node will ever confirm a graceful deletion of these.
    kube.delete(f"{path}?gracePeriodSeconds=0")
    kube.delete_namespace(ns)


def bench_scheduled(ctx: Context, sec: Section, kube: Kube, ns: str, tracker: Tracker) -> None:
    n = ctx.n(100, 16)  # cpu-0 allows 110 pods; the GPU node's taint keeps these off it
    path = f"/api/v1/namespaces/{ns}/pods"
    bodies = [pod_body(f"sched-{i}", node=None, labels={"bench": "sched"}) for i in range(n)]
    load = LoadSpan()
    b = parallel_create(kube, path, bodies, CLIENTS)
    tracker.wait("running", b.created, 300)
    load.stop()
    to_bound = [tracker.seen["bound"][k] - t for k, t in b.created.items()]
    to_running = [tracker.seen["running"][k] - t for k, t in b.created.items()]
    all_running = max(tracker.seen["running"][k] for k in b.created) - b.t0
    sec.add(
        Figure(
            f"scheduled pods (no nodeName), {n} from {CLIENTS} clients: create → Running",
            latency_summary(to_running),
            "",
            str(load),
            f"create → bound p50 {ms(percentile(to_bound, 50))}, p99 {ms(percentile(to_bound, 99))}; "
            f"all Running {secs(all_running)} after the first create ({n / all_running:.0f} pods/s end to end)",
        )
    )
    kube.delete(f"{path}?labelSelector=bench%3Dsched")
    _wait_no_pods(kube, ns)


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    bench_up_down(ctx, sec)
    kube = ctx.cluster.kube()
    ns = f"bench-pods-{suffix()}"
    kube.create_namespace(ns)
    tracker = Tracker(
        {
            "bound": lambda _t, o: bool(o.get("spec", {}).get("nodeName")),
            "running": lambda _t, o: o.get("status", {}).get("phase") == "Running",
        }
    )
    watch = Watch(kube, f"/api/v1/namespaces/{ns}/pods", tracker.on_event).start()
    try:
        bench_bound_sequential(ctx, sec, kube, ns, tracker)
        bench_bound_burst(ctx, sec, kube, ns, tracker)
        bench_scheduled(ctx, sec, kube, ns, tracker)
        bench_create_throughput(ctx, sec, kube)
    finally:
        watch.stop()
        kube.delete_namespace(ns)
        kube.close()
    sec.notes.append(
        "Clients are Python threads on the same 2 cores (a lean HTTP/JSON client, not the `kubernetes` "
        "package), so throughput figures include their CPU share."
    )
    return sec


if __name__ == "__main__":
    import run as runner_main

    sys.exit(runner_main.main([KEY, *sys.argv[1:]]))
