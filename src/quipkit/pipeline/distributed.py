"""Several processes on one quantization run, over torch.distributed (gloo on CPU, NCCL on GPU).

Every process walks the same blocks. In each block, each runs a contiguous share of the calibration
batches (the Hessians are summed with all-reduce, the outputs gathered so every process holds all of
them), then the block's layer groups are divided among the processes, largest first to the least
loaded, and the quantized layers exchanged. One process (the leader) writes the work folder and the
checkpoint. Results do not depend on the number of processes: a layer's seed is its name, a batch's
forward is the same computation wherever it runs, and the Hessians are summed exactly (see
`HessianAccumulator`), so in any grouping. A method whose layer groups depend on
the earlier ones (GPTQ's true-sequential order) has every process round every group.

`Ranks()` without torch.distributed is the single process: every call is then a no-op.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor

from quipkit.errors import QuipkitError
from quipkit.pipeline.activations import OffloadedBatches
from quipkit.rounding import HessianAccumulator


class Ranks:
    """This process's place in the run: `rank` of `world` (0 of 1 without torch.distributed)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> range:
        """This process's contiguous share of `count` items (earlier processes take the remainder)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as err:  # gloo/NCCL: a peer closed its connection or timed out
            raise QuipkitError(f"process {self.rank} of {self.world}: another process of this run stopped while "
                               f"{what} ({str(err).splitlines()[0][:120]}); run the same command to resume from the "
                               "last finished block") from None

    def gather(self, mine: list[Any]) -> list[Any]:
        """Every process's `mine` concatenated in rank order, on every process."""
        if not self.active:
            return mine
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        self._call("exchanging activations", lambda: dist.all_gather_object(parts, mine))
        if isinstance(mine, OffloadedBatches):  # files on this machine: their paths are exchanged, not their data
            return OffloadedBatches.joined(parts)
        return [item for part in parts for item in part]

    def merge(self, accumulator: HessianAccumulator) -> HessianAccumulator:
        """The accumulator of every process's batches (exactly: the same sum as one process's)."""
        if not self.active:
            return accumulator
        import torch.distributed as dist

        pair = accumulator.pair()
        parts = [torch.empty_like(pair) for _ in range(self.world)]
        tokens = torch.tensor([accumulator.tokens], dtype=torch.int64, device=pair.device)
        counts = [torch.empty_like(tokens) for _ in range(self.world)]
        self._call("summing Hessians", lambda: (dist.all_gather(parts, pair), dist.all_gather(counts, tokens)))
        total = HessianAccumulator(pair.shape[-1], pair.device)
        for part, count in zip(parts, counts):
            total.merge(HessianAccumulator.from_pair(part, int(count.item())))
        return total

    def owners(self, costs: list[float]) -> list[int]:
        """The process that does each item: largest cost first, to the least loaded (ties: lowest rank)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[item] = rank
            load[rank] += costs[item]
        return owner

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            self._call("waiting for the others", dist.barrier)


def start_from_environment(device: str | None) -> str | None:
    """Join the process group torchrun (or `quipkit quantize --nproc`) set up, when there is one;
    returns the device this process should use (cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import datetime

    if os.environ.get("QUIPKIT_LAUNCHER_PID"):
        _watch_launcher(int(os.environ["QUIPKIT_LAUNCHER_PID"]))
    import torch.distributed as dist

    gpu = torch.cuda.is_available() and device not in ("cpu",)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(minutes=60))
    return f"cuda:{local}" if gpu else "cpu"


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _watch_launcher(pid: int) -> None:
    """End this process when the launcher that started it is gone (killed): no orphan keeps computing."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def launch(argv: list[str], nproc: int, work: str) -> int:
    """Run `quipkit argv` as `nproc` processes on this machine (what torchrun does, without its
    tracebacks): CPU threads split among them; when one fails the others are stopped and one line
    says which and how to resume. Returns the exit code."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "OMP_NUM_THREADS": threads, "QUIPKIT_LAUNCHER_PID": str(os.getpid())}
        procs.append(subprocess.Popen([sys.executable, "-m", "quipkit.cli", *argv], env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.wait()
        return 130
    if not failed:
        return 0
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()
    rank, code = failed[0]
    if code < 0:
        how = f"was killed ({signal.Signals(-code).name})"
        print(f"quipkit: error: process {rank} of {nproc} {how}; the others were stopped. Finished blocks are kept in "
              f"{work}: run the same command to resume", file=sys.stderr)
        return 1
    return code  # the process said what went wrong
