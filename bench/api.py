"""API figures (issue 6): `python -m dsjobs.api` against the bench cluster.

    .venv/bin/python bench/api.py [--dir DIR] [--quick]

- Create+Execute jobs/s: 8 client threads, each Create then Execute (no operator for this
  project: the figure is the API's and the API server's, not the jobs');
- Get p50/p99 at 500 requests/s, open loop (latency counted from each request's scheduled send
  time, so a stalled server cannot hide behind a slowed client);
- List, page of 50, paging through 10k jobs: p50/p99 per page (reuses bench/controller.py's 10k
  idle jobs when that ran, else creates 10k here);
- log line latency: a job prints a timestamp every 100 ms; a ReadLogs stream (offset 0, following)
  compares each line's arrival with its timestamp (p50/p95; needs the operator and the runner);
- API RSS after all of that (its job watch cache holds every job of the cluster).

Auth is the static token mode of the dev stack (no TokenReview/SubjectAccessReview round trips;
in `kubernetes` mode those are cached for 10 s per token, so a steady load sees the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    VENV_PYTHON,
    Context,
    Figure,
    Kube,
    LoadSpan,
    Section,
    latency_summary,
    load1,
    module_missing,
    ms,
    parallel_create,
    percentile,
    proc_cpu_seconds,
    proc_memory_mib,
    suffix,
    wait_for,
    wait_quiet,
)
from controller import (
    PROJECT_LABEL,
    SHARED_10K,
    OperatorProcess,
    ensure_dsjobs_setup,
    free_port,
    job_body,
    jobs_path,
)

KEY = "api"
TITLE = "API (`bench/api.py`)"
TOKEN = "bench-token"
CLIENTS = 8
GET_RPS = 500
LOG_LINES = 100
LOG_INTERVAL = 0.1


@dataclass
class ApiProcess:
    proc: subprocess.Popen[bytes]
    endpoint: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_api(ctx: Context) -> ApiProcess:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tokens = ctx.work / "api-tokens.yaml"
    tokens.write_text(f'tokens:\n  - token: {TOKEN}\n    user: bench\n    projects: ["*"]\n')
    port = free_port()
    log = ctx.work / "api.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSJOBS_API_", "DSJOBS_S3_"))}
    env.update(ctx.cluster.s3_env())
    env.update(
        {
            "DSJOBS_API_LISTEN": f"127.0.0.1:{port}",
            "DSJOBS_API_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            "DSJOBS_API_KUBECONFIG": str(ctx.cluster.kubeconfig),
            "DSJOBS_API_STATIC_TOKENS": str(tokens),
            "DSJOBS_API_LOG_LEVEL": "WARNING",
        }
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [VENV_PYTHON, "-m", "dsjobs.api"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    api = ApiProcess(proc, f"127.0.0.1:{port}", log)
    ctx.cleanups.append(api.stop)  # whatever happens in between

    def serving() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with grpc.insecure_channel(api.endpoint) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    try:
        wait_for("the API serving", serving, 60, 0.3)
    except BaseException:
        api.stop()
        raise
    return api


MD = (("authorization", f"Bearer {TOKEN}"),)


def _stubs(channel: Any) -> Any:
    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2_grpc as svc_grpc

    return svc_grpc.ProjectJobServiceStub(channel)


def _params(cmd: str) -> Any:
    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2

    return jobs_pb2.JobParameters(cmd=cmd, cloud_instance_types=[jobs_pb2.CloudInstanceType(name="c1.4")])


def create_execute(endpoint: str, project: str, cmd: str) -> tuple[str, float, float]:
    """One Create + Execute; returns (job id, create seconds, execute seconds)."""
    import grpc

    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc

    local = _local_stub(endpoint, grpc)
    t0 = time.monotonic()
    op = local.Create(
        svc.CreateProjectJobRequest(project_id=project, job_parameters=_params(cmd)), metadata=MD, timeout=60
    )
    t1 = time.monotonic()
    resp = svc.CreateProjectJobResponse()
    if not op.response.Unpack(resp):
        raise RuntimeError(f"Create returned no job: {op}")
    local.Execute(svc.ExecuteProjectJobRequest(job_id=resp.job_id), metadata=MD, timeout=60)
    return resp.job_id, t1 - t0, time.monotonic() - t1


_tls = threading.local()


def _local_stub(endpoint: str, grpc: Any) -> Any:
    """One channel per thread: the clients are independent, as separate CLI users are."""
    stub = getattr(_tls, "stub", None)
    if stub is None or getattr(_tls, "endpoint", None) != endpoint:
        _tls.endpoint = endpoint
        _tls.stub = stub = _stubs(grpc.insecure_channel(endpoint))
    return stub


def bench_create_execute(sec: Section, api: ApiProcess, project: str, n: int) -> list[str]:
    ids: list[str] = []
    creates: list[float] = []
    executes: list[float] = []
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS + 1)

    def worker(count: int) -> None:
        try:
            start.wait()
            for _ in range(count):
                job, c, e = create_execute(api.endpoint, project, "echo ok")
                ids.append(job)
                creates.append(c)
                executes.append(e)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n // CLIENTS,)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    load = LoadSpan()
    cpu0 = proc_cpu_seconds(api.pid)
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    load.stop()
    if errors:
        raise errors[0]
    cpu = proc_cpu_seconds(api.pid) - cpu0
    sec.add(
        Figure(
            f"Create+Execute, {CLIENTS} clients, {len(ids)} jobs",
            f"{len(ids) / wall:.0f} jobs/s",
            "",
            str(load),
            f"Create p50 {ms(percentile(creates, 50))} / p99 {ms(percentile(creates, 99))}, "
            f"Execute p50 {ms(percentile(executes, 50))} / p99 {ms(percentile(executes, 99))}; "
            f"API CPU {cpu / wall:.2f} cores; no operator serves this project",
        )
    )
    return ids


async def _open_loop_get(
    endpoint: str, ids: list[str], rps: int, seconds: float
) -> tuple[list[float], int, float]:
    import grpc

    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc

    lat: list[float] = []
    failures = 0
    # The harness's own heap (10k job ids, earlier figures) is no business of the load generator's
    # collections: a full one would delay sends and be counted as the server's latency.
    gc.collect()
    gc.freeze()
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = _stubs(ch)
        await stub.Get(svc.GetProjectJobRequest(job_id=ids[0]), metadata=MD, timeout=10)  # warm the channel
        total = int(rps * seconds)
        t0 = time.monotonic() + 0.1
        tasks = []

        async def one(scheduled: float, job: str) -> None:
            nonlocal failures
            try:
                await stub.Get(svc.GetProjectJobRequest(job_id=job), metadata=MD, timeout=10)
                lat.append(time.monotonic() - scheduled)
            except grpc.RpcError:
                failures += 1

        for i in range(total):
            scheduled = t0 + i / rps
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled, random.choice(ids))))
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
    return lat, failures, total / wall


def bench_get(ctx: Context, sec: Section, api: ApiProcess, ids: list[str]) -> None:
    seconds = ctx.n(20, 4)
    waited, idle = wait_quiet()  # the API server settles the jobs just created
    load = LoadSpan()
    cpu0 = proc_cpu_seconds(api.pid)
    lat, failures, achieved = asyncio.run(_open_loop_get(api.endpoint, ids, GET_RPS, seconds))
    load.stop()
    cpu = proc_cpu_seconds(api.pid) - cpu0
    sec.add(
        Figure(
            f"Get at {GET_RPS} requests/s, open loop, {seconds} s",
            latency_summary(lat),
            "p99 ≤ 10 ms",
            str(load),
            f"offered {achieved:.0f}/s; {failures} errors; API CPU {cpu / seconds:.2f} cores; "
            "latency from the scheduled send time; the client shares the 2 cores; started when the "
            f"CPUs were {idle:.0%} idle (after {waited:.0f} s)",
            ok=not failures and percentile(lat, 99) <= 0.010,
        )
    )


def _ensure_10k(ctx: Context, kube: Kube) -> tuple[str, str, int]:
    if SHARED_10K in ctx.shared:
        ns, project, count = ctx.shared[SHARED_10K]
        return str(ns), str(project), int(count)
    n = ctx.n(10000, 1000)
    ns = f"bench-list-{suffix()}"
    kube.create_namespace(ns, {PROJECT_LABEL: ns})
    parallel_create(kube, jobs_path(ns), [job_body(f"i{i:05d}", ns, execute=False) for i in range(n)])
    ctx.shared[SHARED_10K] = (ns, ns, n)
    return ns, ns, n


def bench_list(ctx: Context, sec: Section, api: ApiProcess, kube: Kube) -> None:
    import grpc

    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc

    _, project, count = _ensure_10k(ctx, kube)
    lat: list[float] = []
    pages = 0
    load = LoadSpan()
    with grpc.insecure_channel(api.endpoint) as ch:
        stub = _stubs(ch)
        token = ""
        for _pass in range(2):
            while True:
                t = time.monotonic()
                r = stub.List(
                    svc.ListProjectJobRequest(project_id=project, page_size=50, page_token=token),
                    metadata=MD,
                    timeout=60,
                )
                lat.append(time.monotonic() - t)
                pages += 1
                token = r.next_page_token
                if not token:
                    break
    load.stop()
    sec.add(
        Figure(
            f"List, page of 50, paging through {count} jobs (twice, one client)",
            latency_summary(lat),
            "p99 ≤ 50 ms",
            str(load),
            f"{pages} pages; each page is a Kubernetes list with limit/continue",
            ok=percentile(lat, 99) <= 0.050,
        )
    )


def bench_logs(ctx: Context, sec: Section, api: ApiProcess, kube: Kube) -> None:
    import grpc

    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc

    if missing := module_missing("dsjobs.controller", runnable=True) or module_missing(
        "dsjobs.runner", runnable=True
    ):
        sec.skip(f"log line latency: {missing}")
        return
    ns = f"bench-logs-{suffix()}"
    kube.create_namespace(ns, {PROJECT_LABEL: ns})
    op = OperatorProcess(ctx, [ns], "logs").start()
    try:
        lines = ctx.n(LOG_LINES, 30)
        cmd = (
            f'python -u -c "import time; [print(repr(time.time()), flush=True) or time.sleep({LOG_INTERVAL}) '
            f'for _ in range({lines})]"'
        )
        load = LoadSpan()
        job, _, _ = create_execute(api.endpoint, ns, cmd)
        lat: list[float] = []
        with grpc.insecure_channel(api.endpoint) as ch:
            stub = _stubs(ch)
            offset = 0
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    for resp in stub.ReadLogs(
                        svc.ReadProjectJobLogsRequest(job_id=job, offset=offset), metadata=MD, timeout=180
                    ):
                        now = time.time()
                        offset = resp.offset
                        for m in resp.logs:
                            if m.file_path:  # system log, progress: not the program's stdout
                                continue
                            for line in m.content.decode(errors="replace").splitlines():
                                with contextlib.suppress(ValueError):  # a line that is not a timestamp
                                    lat.append(now - float(line.strip()))
                    break  # the stream ended: the job is final and every record was sent
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    time.sleep(0.5)  # as the CLI does: reconnect with the last offset
        load.stop()
        if not lat:
            sec.skip(f"log line latency: no stdout lines came back for job {job}")
            return
        sec.add(
            Figure(
                f"log line latency, print → ReadLogs (following), {len(lat)} of {lines} lines",
                f"p50 {ms(percentile(lat, 50))}, p95 {ms(percentile(lat, 95))}, max {ms(max(lat))}",
                "p95 ≤ 1 s",
                str(load),
                "one line per 100 ms; includes the runner's ship interval and the API's log poll (300 ms)",
                ok=len(lat) == lines and percentile(lat, 95) <= 1.0,
            )
        )
    finally:
        op.stop()


def _count_jobs(kube: Kube) -> int:
    page = kube.get("/apis/dsjobs.dev/v1alpha1/projectjobs?limit=1")
    return len(page.get("items") or []) + int((page.get("metadata") or {}).get("remainingItemCount") or 0)


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    if missing := module_missing("dsjobs.api", runnable=True):
        sec.skip(f"all API figures: {missing}")
        return sec
    ensure_dsjobs_setup(ctx)
    kube = ctx.cluster.kube()
    project = f"bench-api-{suffix()}"
    kube.create_namespace(project, {PROJECT_LABEL: project})
    api = start_api(ctx)
    try:
        rss0, _ = proc_memory_mib(api.pid)
        ids = bench_create_execute(sec, api, project, ctx.n(400, 40))
        bench_get(ctx, sec, api, ids)
        bench_list(ctx, sec, api, kube)
        bench_logs(ctx, sec, api, kube)
        rss, hwm = proc_memory_mib(api.pid)
        sec.add(
            Figure(
                "API RSS at the end",
                f"{rss:.0f} MiB (peak {hwm:.0f} MiB)",
                "",
                f"{load1():.1f}",
                f"at start {rss0:.0f} MiB; the cluster holds {_count_jobs(kube)} jobs (the API's watch caches them all)",
            )
        )
    finally:
        api.stop()
        kube.close()
    return sec


if __name__ == "__main__":
    import run as runner_main

    sys.exit(runner_main.main([KEY, *sys.argv[1:]]))
