"""Running a plan on this machine: every job whose dependencies are done, one per device. The jobs die with the
driver: each runs in a process group of its own, which the driver ends when it is interrupted or terminated, and on
Linux a job also gets a SIGTERM when the driver dies by kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .jobs import Job
from .presets import ROOT


def _die_with_parent() -> None:
    """Run in a job's process before it starts: ask Linux for a SIGTERM when the driver dies, even by kill -9
    (prctl PR_SET_PDEATHSIG); if the driver is already gone, end at once. Elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def _start(cmd: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group of its own: the driver can end the job and whatever it started
        preexec_fn=_die_with_parent,
    )


def _stop(processes: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each job's process group, then SIGKILL what is still there after `grace` seconds."""
    for proc in processes:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for proc in processes:
        try:
            proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_jobs(jobs: list[Job], devices: list[str], eval_workers: int) -> None:
    """Run every job whose dependencies are done, one per device (and eval_workers device-free jobs at a time). When
    the driver is interrupted (Ctrl-C) or terminated (SIGTERM), it ends every running job before it exits."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    running: dict[subprocess.Popen, tuple[Job, str | None]] = {}
    try:
        _run(jobs, devices, eval_workers, running)
    except BaseException:
        if running:
            print(
                f"stopping {len(running)} running job(s): {', '.join(j.name for j, _ in running.values())}", flush=True
            )
            _stop(list(running))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(jobs: list[Job], devices: list[str], eval_workers: int, running: dict) -> None:
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        if j.done():
            j.status = "done"
    waiting = {}  # what more jobs wait for starts first (the plan order otherwise): shared adapters early
    for j in jobs:
        for d in j.deps:
            waiting[d] = waiting.get(d, 0) + 1
    todo = sorted((j for j in jobs if j.status == "pending"), key=lambda j: waiting.get(j.name, 0) < 2)
    print(f"{len(jobs)} jobs: {len(jobs) - len(todo)} already done, {len(todo)} to run", flush=True)
    free = list(devices)
    n_free_evals = eval_workers
    t0 = time.time()
    finished = 0
    while True:
        for j in todo:
            if j.status != "pending":
                continue
            dep_status = [by_name[d].status for d in j.deps if d in by_name]
            if any(s in ("failed", "skipped") for s in dep_status):
                j.status = "skipped"
                print(f"SKIPPED {j.name}: a job it needs failed", flush=True)
                continue
            if any(s != "done" for s in dep_status):
                continue
            if j.needs_device and not free:
                continue
            if not j.needs_device and n_free_evals == 0:
                continue
            device = free.pop(0) if j.needs_device else None
            n_free_evals -= 0 if j.needs_device else 1
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if device is not None and device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = device
            if device == "cpu" and devices.count("cpu") > 1:  # several CPU jobs at once: share the cores
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // devices.count("cpu")))
            j.log.parent.mkdir(parents=True, exist_ok=True)
            if j.record:
                j.record.parent.mkdir(parents=True, exist_ok=True)
                j.record.write_text(json.dumps(j.settings) + "\n")
            with open(j.log, "a") as f:
                f.write(f"\n$ {' '.join(j.cmd)}\n")
            with open(j.log, "a") as log:
                proc = _start(j.cmd, env, log)
            j.status, j.seconds = "running", time.time()
            running[proc] = (j, device)
            print(f"[{time.strftime('%H:%M:%S')}] start {j.name} on {device or 'no device'}", flush=True)
        if not running:
            break
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            j, device = running.pop(proc)
            if device is not None:
                free.append(device)
            else:
                n_free_evals += 1
            finished += 1
            ok = proc.returncode == 0 and j.done()
            j.status, j.seconds = "done" if ok else "failed", time.time() - j.seconds
            elapsed = time.time() - t0
            eta = elapsed / finished * (len(todo) - finished)
            print(
                f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {j.name} in {j.seconds:.0f} s"
                f"{'' if ok else f' (exit {proc.returncode}; log: {j.log})'} | {finished}/{len(todo)}, "
                f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                flush=True,
            )
    ran = [j for j in todo if j.status in ("done", "failed")]
    if ran:
        phases = {}
        for j in ran:
            phases.setdefault(j.phase, []).append(j.seconds)
        print(
            f"time per phase (job wall time, summed; {time.time() - t0:.0f} s wall clock): "
            + ", ".join(f"{p} {sum(v):.0f} s in {len(v)} jobs" for p, v in phases.items()),
            flush=True,
        )
    failed = [j for j in jobs if j.status in ("failed", "skipped")]
    if failed:
        print(f"\n{len(failed)} job(s) did not finish:", flush=True)
        for j in failed:
            print(f"  {j.status:<8} {j.name}  log: {j.log}", flush=True)
