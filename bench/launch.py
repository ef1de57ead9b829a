"""Run a function on N local processes joined in a gloo (or NCCL) process group.

Used by the distributed checks of ``usp-bench verify``, by ``usp-bench scaling`` and by
the tests: every rank gets one CPU thread, the group a free port and a timeout, so a
rank that fails makes its peers fail within ``pg_timeout_s`` instead of hanging. The
launcher gives the ranks ``start_timeout_s`` to start (spawn, imports, joining the
group: slow on a loaded machine), then ``timeout_s`` from the moment all have started
to finish, and kills what is left.

Nothing a local run opens listens beyond loopback: torch's rendezvous store listens on
every interface of the machine, without authentication, so the launcher hosts the store
itself on a socket it has bound to 127.0.0.1 and hands to the store, and points gloo (and
NCCL's bootstrap) at the loopback interface unless ``GLOO_SOCKET_IFNAME`` (or
``NCCL_SOCKET_IFNAME``) is already set.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class RankOutcome:
    rank: int
    ok: bool
    value: Any  # fn's return value, or the formatted exception
    seconds: float


class WorkersFailed(RuntimeError):
    """At least one rank raised, or did not finish in time."""

    def __init__(self, outcomes: list[RankOutcome]):
        self.outcomes = outcomes
        lines = [f"rank {o.rank}: {o.value.strip().splitlines()[-1] if o.value else 'no result'}"
                 for o in outcomes if not o.ok]
        super().__init__("distributed run failed:\n  " + "\n  ".join(lines))


def cores_available() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (one rank of its group)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def join_torchrun_group(timeout_s: float) -> torch.device:
    """Join the process group torchrun set up (NCCL on this rank's GPU ``LOCAL_RANK`` when
    CUDA is there, else gloo) and return this rank's device."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str:
    """The name of this machine's loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return min(names, key=len) if names else "lo"


def loopback_store(timeout_s: float) -> dist.TCPStore:
    """A rendezvous store served by this process on ``127.0.0.1`` only (its ``port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port, fd = listener.getsockname()[1], os.dup(listener.fileno())
    # the store serves on (and owns) a duplicate of the bound socket; the original is closed
    try:
        return dist.TCPStore("127.0.0.1", port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _worker(rank, world_size, port, backend, pg_timeout_s, start_timeout_s, fn, args, results):
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=start_timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        results.put(("ready", rank))
        start = time.perf_counter()
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
        results.put(("done", rank, True, value, time.perf_counter() - start))
    except BaseException:  # report everything, including a KeyboardInterrupt, to the parent
        results.put(("done", rank, False, traceback.format_exc(), time.perf_counter() - start))


def spawn(world_size: int, fn: Callable, args: tuple = (), *, pg_timeout_s: float = 60.0,
          timeout_s: float = 600.0, start_timeout_s: float = 300.0, backend: str = "gloo") -> list[RankOutcome]:
    """Run ``fn(*args)`` on ranks ``0 .. world_size - 1``; return each rank's outcome
    (``seconds``: from joining the group to the result, or to being killed or found
    dead). ``backend="nccl"`` gives rank ``i`` GPU ``i`` (mod the GPU count).

    ``fn`` must be importable by name (a module-level function) and its result picklable.
    A rank that has not joined the group after ``start_timeout_s``, or has no result
    ``timeout_s`` after every rank joined, is killed and reported as not ok.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    context = mp.get_context("spawn")
    results = context.Queue()
    store = loopback_store(start_timeout_s + timeout_s)  # lives, in this process, until the ranks are done
    loopback = loopback_interface()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", loopback),
           "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", loopback)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # read by the children as they start
    try:
        settings = (world_size, store.port, backend, pg_timeout_s, start_timeout_s, fn, args, results)
        processes = [context.Process(target=_worker, daemon=True, args=(rank, *settings)) for rank in range(world_size)]
        for process in processes:
            process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outcomes: dict[int, RankOutcome] = {}
    joined: dict[int, float] = {}  # rank -> when it reported joining the group

    def collect(wait_s: float) -> bool:
        try:
            message = results.get(timeout=wait_s) if wait_s else results.get_nowait()
        except queue_module.Empty:
            return False
        if message[0] == "ready":
            joined[message[1]] = time.monotonic()
        else:
            outcomes[message[1]] = RankOutcome(*message[1:])
        return True

    started = time.monotonic()
    all_started = None  # when every rank had joined the group, died or reported
    while len(outcomes) < world_size:
        now = time.monotonic()
        if all_started is None and all(r in joined or r in outcomes or not p.is_alive()
                                       for r, p in enumerate(processes)):
            all_started = now
        if now >= (all_started + timeout_s if all_started is not None else started + start_timeout_s):
            break
        if not collect(0.2) and all(r in outcomes or not p.is_alive() for r, p in enumerate(processes)):
            break  # every rank reported or died; a dead rank's report, if any, is already in the queue
    while collect(0):
        pass
    killed_here = set()
    for rank, process in enumerate(processes):
        process.join(timeout=5.0 if len(outcomes) == world_size else 0.1)
        if process.is_alive():
            process.kill()
            process.join()
            killed_here.add(rank)
    for rank in range(world_size):
        if rank not in outcomes:
            killed = rank in killed_here
            exitcode = processes[rank].exitcode
            if killed and rank not in joined:
                reason = f"did not join the process group within {start_timeout_s:g} s"
            elif killed and all_started is None:
                reason = f"killed after other ranks did not join the process group within {start_timeout_s:g} s"
            elif killed:
                reason = f"no result within {timeout_s:g} s of the start"
            elif exitcode < 0:
                reason = f"killed by signal {-exitcode} without a result"
            else:
                reason = f"exited with code {exitcode} without a result"
            outcomes[rank] = RankOutcome(rank, False, reason, time.monotonic() - joined.get(rank, started))
    return [outcomes[r] for r in range(world_size)]


def run(world_size: int, fn: Callable, args: tuple = (), **kwargs) -> list[Any]:
    """``spawn``, and every rank's return value; raises ``WorkersFailed`` if any rank failed."""
    outcomes = spawn(world_size, fn, args, **kwargs)
    if not all(o.ok for o in outcomes):
        raise WorkersFailed(outcomes)
    return [o.value for o in outcomes]
