"""The processes of one render: torch.distributed under torchrun, with waits that cannot hang.

A run started by ``torchrun`` (or ``diffsynth run --nproc-per-node N``, which starts torchrun's
elastic launcher) has ``WORLD_SIZE`` > 1 in its environment: :meth:`Cluster.from_env` joins the
process group — ``gloo`` on the CPU, ``cpu:gloo,cuda:nccl`` on CUDA (rank → ``cuda:LOCAL_RANK``)
— and everything the ranks say to each other goes through it or through its key-value store
(``torch.distributed``'s own ``TCPStore``), never through sockets of our own.

Waiting. Ranks meet at :meth:`Cluster.barrier` between stages and steps. A barrier polls a
counter in the store instead of blocking in a collective, so a rank may wait as long as the
others work (rank 0 encoding the video, say) and still notice at once when something went wrong:

- every rank beats a heartbeat into the store from a thread; a rank whose heartbeat stops for
  ``timeout`` seconds (killed, frozen, its machine gone) stops every waiting rank with a
  message naming it and its host;
- a rank that fails calls :meth:`report_error` (the CLI does, for any exception): the others
  raise :class:`ClusterError` with its rank, host and message at their next barrier, promptly.

Collectives that move data (the boundary exchange of a denoising step, broadcasts) run right
after a barrier, so they never wait long; the process group's own ``timeout`` bounds them too.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("diffsynth")

DEFAULT_TIMEOUT = 600.0
"""Seconds a rank may be silent (no heartbeat) before the others give up; ``DIFFSYNTH_DIST_TIMEOUT`` or ``--dist-timeout``."""

_HEARTBEAT_SECONDS = 1.0


class ClusterError(RuntimeError):
    """Another rank failed or stopped answering; the message names it, its host and the cause."""


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']!r} in the environment; it must be a number (torchrun sets it)") from None


def timeout_from_env(value: float | None = None) -> float:
    """The rank timeout in seconds: ``value``, else ``$DIFFSYNTH_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    if value is None:
        text = os.environ.get("DIFFSYNTH_DIST_TIMEOUT")
        if text is None:
            return DEFAULT_TIMEOUT
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"DIFFSYNTH_DIST_TIMEOUT is {text!r}; give a number of seconds, e.g. 600") from None
    if value <= 0:
        raise ValueError(f"the distributed timeout must be > 0 seconds, got {value}")
    return float(value)


@dataclass
class Member:
    """Who a rank is: for messages and ``diffsynth status``."""

    rank: int
    host: str
    pid: int
    local_rank: int

    def __str__(self) -> str:
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"


@dataclass
class Cluster:
    """This process's place in the render: rank, world size, the store, and the waits (module docstring)."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str
    timeout: float
    restart: int = 0
    members: list[Member] = field(default_factory=list)
    shared_folder: bool = True  # every rank writes into rank 0's output folder (else: folders local to each machine)
    folder_leader: bool = True  # the lowest rank writing into this rank's folder: it alone deletes and cleans there
    _store: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    exchanged: int = 0  # bytes this rank sent in exchanges: the denoising's boundary predictions (and frames without a shared disk)
    waited: float = 0.0  # seconds spent at barriers

    # ------------------------------------------------------------------ setup

    @classmethod
    def from_env(cls, device: str | None = None, timeout: float | None = None) -> "Cluster":
        """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

        ``device``: the config's ``models.device``; ``cuda`` adds NCCL for CUDA tensors and pins
        this rank to ``cuda:LOCAL_RANK``. On the CPU each rank takes its share of the cores
        unless ``OMP_NUM_THREADS`` says otherwise.
        """
        import torch.distributed as dist

        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: start several processes with "
                             "`diffsynth run CONFIG --nproc-per-node N` or `torchrun --nproc-per-node N -m diffsynth run CONFIG`")
        timeout = timeout_from_env(timeout)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cuda = str(device or "").startswith("cuda")
        if cuda:
            if not torch.cuda.is_available():
                raise ValueError("models.device is 'cuda' but this process sees no CUDA device; set models.device to 'cpu' or run on a GPU machine")
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"local rank {local_rank} needs cuda:{local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s): start at most {torch.cuda.device_count()} processes per machine (--nproc-per-node)")
            torch.cuda.set_device(local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        # The launcher's store outlives a restart of the group; keys of the attempt before (a dead rank's address)
        # would be read as this attempt's. Every attempt gets keys of its own.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)  # else rank 0 hosts it
        tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=not agent_store and rank == 0,
                            timeout=datetime.timedelta(seconds=timeout))
        store = dist.PrefixStore(f"diffsynth/attempt_{restart}", tcp)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
        cluster = cls(rank=rank, world=world, local_rank=local_rank, local_world=local_world, backend=backend, timeout=timeout, restart=restart)
        cluster._store = store
        cluster._start_heartbeat()
        me = Member(cluster.rank, platform.node(), os.getpid(), local_rank)
        cluster.members = cluster.all_gather(me)
        return cluster

    @classmethod
    def solo(cls) -> "Cluster":
        """A world of one process: every wait returns at once, every gather is this rank's value."""
        return cls(rank=0, world=1, local_rank=0, local_world=1, backend="none", timeout=DEFAULT_TIMEOUT,
                   members=[Member(0, platform.node(), os.getpid(), 0)])

    def close(self) -> None:
        """Stop the heartbeat and leave the process group."""
        import torch.distributed as dist

        self._stop.set()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def me(self) -> Member:
        return self.members[self.rank]

    def device(self, device: str | None) -> str | None:
        """The config's ``models.device`` for this rank: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if device is not None and str(device) == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    # ------------------------------------------------------------------ the store

    def _key(self, name: str) -> str:
        return f"diffsynth/{self.restart}/{name}"

    def _store_call(self, method: str, *args):
        with self._lock:  # one store client, two threads (heartbeat and main)
            return getattr(self._store, method)(*args)

    def _start_heartbeat(self) -> None:
        key = self._key(f"heartbeat/{self.rank}")

        def beat():
            count = 0
            while not self._stop.wait(_HEARTBEAT_SECONDS):
                count += 1
                try:
                    self._store_call("set", key, str(count))
                except Exception as exc:  # the store is gone: the run is ending (the main thread will see why)
                    logger.debug("heartbeat of rank %d stopped: %s", self.rank, exc)
                    return

        self._store_call("set", key, "0")
        threading.Thread(target=beat, name=f"diffsynth-heartbeat-{self.rank}", daemon=True).start()

    def report_error(self, message: str) -> None:
        """Tell every rank that this one failed (they stop at their next barrier with ``message``)."""
        if self.world == 1:
            return
        text = f"{self.me if self.members else f'rank {self.rank}'} failed: {message}"
        try:
            self._store_call("set", self._key("error"), text)
        except Exception as exc:  # the store may be gone with rank 0; the launcher still stops the group
            logger.warning("could not tell the other ranks that rank %d failed: %s", self.rank, exc)

    def _check_error(self) -> None:
        key = self._key("error")
        if self._store_call("check", [key]):
            message = self._store_call("get", key).decode("utf-8", "replace")
            raise ClusterError(f"stopped because {message}")

    # ------------------------------------------------------------------ waits

    def barrier(self, what: str) -> None:
        """Wait until every rank reaches the barrier of the same number; ``what`` names it in messages."""
        if self.world == 1:
            return
        self._count += 1
        key = self._key(f"barrier/{self._count}")
        self._store_call("add", key, 1)
        started = time.monotonic()
        beats: dict[int, tuple[bytes, float]] = {}
        delay = 0.002
        while self._store_call("add", key, 0) < self.world:
            self._check_error()
            self._check_heartbeats(what, beats)
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        self.waited += time.monotonic() - started

    def _check_heartbeats(self, what: str, beats: dict[int, tuple[bytes, float]]) -> None:
        now = time.monotonic()
        for member in self.members:
            if member.rank == self.rank:
                continue
            value = self._store_call("get", self._key(f"heartbeat/{member.rank}"))
            seen = beats.get(member.rank)
            if seen is None or seen[0] != value:
                beats[member.rank] = (value, now)
            elif now - seen[1] > self.timeout:
                raise ClusterError(f"{member} has not answered for {self.timeout:.0f} s while the other ranks wait at {what}: "
                                   "it was killed or its machine is unreachable. Rerun the same command (with the same or another "
                                   "number of processes) to continue; raise the limit with --dist-timeout or DIFFSYNTH_DIST_TIMEOUT")

    # ------------------------------------------------------------------ data

    def broadcast(self, value, src: int = 0):
        """``value`` of rank ``src``, on every rank (pickled; small things only)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, value) -> list:
        """Every rank's ``value``, in rank order (pickled; small things only)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def exchange(self, sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor]) -> None:
        """Send ``sends[peer]`` to each peer and fill ``receives[peer]`` from it, all at once (CPU tensors)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        # CPU tensors: they go through gloo, also in the cpu:gloo,cuda:nccl group of a CUDA run
        ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer) for peer, tensor in sorted(sends.items())]
        ops += [dist.P2POp(dist.irecv, tensor, peer) for peer, tensor in sorted(receives.items())]
        if ops:
            try:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            except RuntimeError as exc:  # gloo's timeout or a closed connection: a peer died or hangs
                peers = ", ".join(str(self.members[p]) for p in sorted(set(sends) | set(receives)))
                raise ClusterError(f"the exchange with {peers} failed ({exc}): that process stopped or the network between "
                                   "the machines broke. Rerun the same command to continue") from exc
        self.exchanged += sum(t.numel() * t.element_size() for t in sends.values())

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (a collective decision)."""
        return flag if self.world == 1 else any(self.all_gather(bool(flag)))



# ---------------------------------------------------------------------- who does what


def frame_share(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous, balanced share of ``n`` frames (per-frame stages)."""
    return range(rank * n // world, (rank + 1) * n // world)


def window_owners(window_sizes: list[int], world: int) -> list[int]:
    """The rank of each sliding window: contiguous runs, balanced by frames (a window's cost is its frame count).

    Rank ``r``'s run starts at the window boundary nearest to ``r/world`` of all the frames,
    and every rank gets at least one window while there are enough; with fewer windows than
    ranks, window ``k`` goes to rank ``k`` and the last ranks get none.
    """
    count = len(window_sizes)
    if count <= world:
        return list(range(count))
    before = [0]
    for size in window_sizes:
        before.append(before[-1] + size)  # frames in the windows before each boundary
    total = before[-1]
    starts = [0]
    for r in range(1, world):
        lowest, highest = starts[-1] + 1, count - (world - r)  # leave a window for each later rank
        goal = r * total / world
        starts.append(min(range(lowest, highest + 1), key=lambda k: (abs(before[k] - goal), k)))
    owners = []
    for r, (first, stop) in enumerate(zip(starts, starts[1:] + [count])):
        owners += [r] * (stop - first)
    return owners


@dataclass(frozen=True)
class Layout:
    """Which frames a rank works on, from the frame count, the sliding windows and the world size alone.

    ``owners[k]``: the rank of window ``k`` (:func:`window_owners`). A frame is *owned* by the
    rank of the last window covering it (that rank writes its final latents, decodes and smooths
    it when folders are local to each machine); ``cover(r)`` is every frame rank ``r``'s windows
    touch (its boundary frames included).
    """

    n: int
    starts: tuple[int, ...]  # first frame of each window
    ends: tuple[int, ...]
    owners: tuple[int, ...]
    frame_owners: tuple[int, ...]  # the owner of each frame

    @classmethod
    def of(cls, n: int, windows, world: int) -> "Layout":
        owners = window_owners([w.end - w.start for w in windows], world)
        frame_owners, k = [], 0
        for i in range(n):  # windows start in order: the last one starting at or before i covers i
            while k + 1 < len(windows) and windows[k + 1].start <= i:
                k += 1
            frame_owners.append(owners[k])
        return cls(n, tuple(w.start for w in windows), tuple(w.end for w in windows), tuple(owners), tuple(frame_owners))

    def owned(self, rank: int) -> range:
        frames = [i for i, owner in enumerate(self.frame_owners) if owner == rank]
        return range(frames[0], frames[-1] + 1) if frames else range(0)

    def cover(self, rank: int) -> range:
        mine = [k for k, owner in enumerate(self.owners) if owner == rank]
        return range(self.starts[mine[0]], self.ends[mine[-1]]) if mine else range(0)


def rank_share(layout: Layout, rank: int, world: int, shared_folder: bool) -> range:
    """A rank's frames in the per-frame stages: a balanced share in a shared folder, the frames it owns (:class:`Layout`) otherwise."""
    return frame_share(layout.n, rank, world) if shared_folder else layout.owned(rank)
