"""The tensor-parallel process group: one process per rank, gloo on CPU, NCCL on CUDA, every
collective bounded by a timeout, and a store channel rank 0 uses to tell the others what to run.

```
 rank 0 (leader)                                   ranks 1..N-1 (followers)
   TCPStore host (own launcher) or client ───────── TCPStore clients
   Channel.send(msg k) ─► store key "tp/msg/k" ───► Channel.receive(): waits for key k, no time limit
   all_reduce / broadcast ◄──── process group (gloo | nccl), `timeout` s per collective ────►
```

A process is one rank: `init_group` makes the group this process's (`active()`), and every eager
runtime built afterwards is tensor-parallel (vlmrt/tp/runtime.py). The store channel has no time
limit so that an idle server's followers wait for the next request as long as it takes; a rank 0
that dies takes the store host with it (our launcher), or torchrun stops the group, so no wait is
unbounded in practice. Collectives do have a limit: a rank that dies or hangs mid-step makes the
others fail with a VlmrtError within `timeout` seconds (gloo usually sees the closed socket at once).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vlmrt.errors import VlmrtError

DEFAULT_TIMEOUT_S = 300.0  # per collective: covers one rank loading its shard slower than another
IDLE_WAIT = timedelta(days=365)  # a follower waits this long for rank 0's next message
_ACTIVE: "TPGroup | None" = None


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group.

    Args:
        rank: 0..world-1; rank 0 schedules and is the only one that prints.
        world: ranks in the group.
        device: this rank's device (cuda:LOCAL_RANK on CUDA).
        timeout_s: the limit of every collective.
        channel: rank 0's messages to the others.
    """

    rank: int
    world: int
    device: torch.device
    timeout_s: float
    channel: "Channel"

    @property
    def leader(self) -> bool:
        return self.rank == 0


def env_rank() -> tuple[int, int] | None:
    """(rank, world) from torchrun's (or our launcher's) environment, or None outside a group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def check_devices(world: int, device: torch.device, available: int | None = None) -> None:
    """A clear error when a CUDA group has more ranks than this machine has devices."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if available is None else available
    if world > count:
        raise VlmrtError(f"--tp {world} needs {world} CUDA devices, this machine has {count}; lower --tp "
                         "(or run on --device cpu, where the ranks share the CPU)")


def init_group(world: int, device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join the group of `world` ranks this process was started in (torchrun or `vlmrt.tp.launch`).

    Args:
        world: the --tp value; must match WORLD_SIZE.
        device: "cpu" (gloo) or "cuda" (NCCL, one device per rank: cuda:LOCAL_RANK).
        timeout_s: the limit of every collective and of the rendezvous.
    """
    global _ACTIVE
    got = env_rank()
    if got is None:
        raise VlmrtError(f"--tp {world} needs RANK and WORLD_SIZE in the environment: start with "
                         f"`torchrun --nproc-per-node {world} -m vlmrt ...`, or let `vlmrt ... --tp {world}` start the ranks")
    rank, size = got
    if size != world:
        raise VlmrtError(f"--tp {world} but WORLD_SIZE is {size}; give torchrun --nproc-per-node {world}")
    dev = torch.device(device)
    check_devices(world, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    else:  # the ranks share this machine's cores: oversubscribed threads make every collective wait on a straggler
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    if addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: gloo must not pick another interface
    timeout = timedelta(seconds=timeout_s)
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # torchrun's agent hosts its own
    try:
        store = dist.TCPStore(addr, port, world, is_master=host, timeout=timeout)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.PrefixStore("pg", store),
                                rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        raise VlmrtError(f"rank {rank} of {world} could not join the tensor-parallel group at {addr}:{port} within "
                         f"{timeout_s:g} s ({first_line(e)}); check that every rank started") from None
    channel = Channel(dist.TCPStore(addr, port, world, is_master=False, timeout=IDLE_WAIT), rank, world)
    _ACTIVE = TPGroup(rank, world, dev, timeout_s, channel)
    return _ACTIVE


def active() -> TPGroup | None:
    """The group this process belongs to (None: no tensor parallelism)."""
    return _ACTIVE


def close_group() -> None:
    """Leave the group (rank 0 first tells the followers to stop: `Channel.stop`)."""
    global _ACTIVE
    g, _ACTIVE = _ACTIVE, None
    if g is not None and dist.is_initialized():
        dist.destroy_process_group()


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def collective_error(e: BaseException) -> VlmrtError:
    g = active()
    who = f"rank {g.rank} of {g.world}" if g else "this rank"
    limit = f"{g.timeout_s:g} s" if g else "the timeout"
    return VlmrtError(f"tensor parallel: {who} lost the others during a collective ({first_line(e)}): another rank "
                      f"died or did not answer within {limit}; see that rank's error above")


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks in place (row-parallel outputs); a dead or silent rank is a VlmrtError.
    Under torch.compile (the compiled runtime) the functional all-reduce, which the graph holds."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t, "sum", dist.group.WORLD)
    try:
        dist.all_reduce(t)
    except RuntimeError as e:
        raise collective_error(e) from None
    return t


class Channel:
    """Rank 0's messages to the followers over the store: message k at key "tp/msg/k" (pickled,
    tensors on the CPU), read by every follower, deleted by the last one to read it."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world, self.count = store, rank, world, 0

    def send(self, message) -> None:
        """Rank 0: publish the next message."""
        try:
            self.store.set(f"tp/msg/{self.count}", pickle.dumps(message))
        except RuntimeError as e:
            raise collective_error(e) from None
        self.count += 1

    def receive(self):
        """A follower: wait for the next message (no time limit: an idle server sends nothing)."""
        key = f"tp/msg/{self.count}"
        try:
            message = pickle.loads(self.store.get(key))
            if self.store.add(f"tp/ack/{self.count}", 1) == self.world - 1:  # the last reader cleans up
                self.store.delete_key(key)
                self.store.delete_key(f"tp/ack/{self.count}")
        except RuntimeError as e:
            raise VlmrtError(f"tensor parallel: rank {self.rank} lost rank 0 ({first_line(e)}); see rank 0's error") from None
        self.count += 1
        return message
