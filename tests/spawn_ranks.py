"""Launch test workers as gloo ranks on this machine, with a deadline instead of a possible hang."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
import torch


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def become_rank(rank: int, port: int, world: int) -> None:
    """In a spawned worker: the environment Lightning's DDP reads to join a gloo group of ``world``
    ranks on this machine as ``rank``, and one thread per rank."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)


def run_ranks(worker: Callable, args: tuple, world: int, timeout_s: float, out_dir: str) -> list:
    """Spawn ``worker(rank, *args)`` on ``world`` processes; each saves ``out_dir/rank{r}.pt``.

    Fails the test (and terminates the workers) if they have not all finished after ``timeout_s``.
    """
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} gloo processes did not finish within {timeout_s} s (deadlock?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
