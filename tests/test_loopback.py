"""A local run listens on loopback only: while the launcher's ranks run, no socket that
the run's processes (the launcher, which hosts the rendezvous store, and the ranks)
listen on is bound outside 127.0.0.0/8 or ::1."""

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from usp.bench.launch import run

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists() or sys.platform != "linux",
                                reason="reads the listening sockets from /proc (Linux)")


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``/proc/net/tcp{,6}`` addresses: 32-bit words in host (little-endian) byte order."""
    words = bytes.fromhex(hex_address)
    packed = b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4))
    return ipaddress.ip_address(packed)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                found.append((str(_address(address)), int(port, 16)))
    return found


def _sockets_of_the_run() -> dict:
    """On every rank: the listening sockets of the launcher and of every rank, taken while
    all of them are in the process group."""
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    dist.all_reduce(torch.ones(1))  # a collective, so that gloo's connections are all made
    found = {"launcher": listening_sockets(os.getppid()),
             **{f"rank {rank}": listening_sockets(pid) for rank, pid in enumerate(pids)}}
    dist.barrier()  # nobody leaves before every rank has looked
    return found


def test_a_local_run_listens_on_loopback_only():
    for found in run(2, _sockets_of_the_run, pg_timeout_s=60):
        for process, sockets in found.items():
            for address, port in sockets:
                assert ipaddress.ip_address(address).is_loopback, f"{process} listens on {address}:{port}"
        assert found["launcher"], "the launcher hosts the rendezvous store: it must listen"
        assert found["rank 0"] or found["rank 1"], "gloo's ranks listen for their peers"


def test_the_socket_table_is_read_correctly():
    """The reader itself: a socket bound to every interface is seen as such."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(1)
        assert ("0.0.0.0", listener.getsockname()[1]) in listening_sockets(os.getpid())
