"""Running a fidelity job on a Ray cluster: connecting, resources, and the one Ray Data stage they share.

```
 driver (this process)                         cluster
 names of the work ─► ray.data.from_items ─► map_batches(Actor, compute=ActorPoolStrategy(size=N),
                                               num_cpus=F, num_gpus=G): N actors, each loads its
 write results ◄── iter_batches(blocks) ◄───── model once and handles batch after batch
```

Ray is an optional dependency (`pip install 'vlmrt[ray]'`) and is imported here and in the `ray_*`
modules only. The address is `--address`, else `RAY_ADDRESS`, else a new local cluster (never the
latest cluster someone else started on the machine, which `ray.init()` without an address would
join). Actors ask for fractional CPUs by default: a pool that holds every CPU leaves none for Ray
Data's own tasks, and the job stalls.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vlmrt.errors import VlmrtError

RAY_MISSING = "--ray needs Ray Data, which is not installed; install it with: pip install 'vlmrt[ray]'"


@dataclass(frozen=True)
class RayResources:
    """Where a job runs and what each of its actors holds."""

    address: str | None = None  # "host:6379" or "ray://host:10001"; None: RAY_ADDRESS, else a new local cluster
    actors: int = 1  # actors in the pool; each loads the model once
    cpus_per_actor: float = 0.5  # fractional: leave CPUs for Ray Data's own tasks
    gpus_per_actor: float = 0.0  # e.g. 1 with --device cuda (Ray sets CUDA_VISIBLE_DEVICES per actor)

    def __post_init__(self):
        if self.actors < 1:
            raise VlmrtError(f"--actors must be at least 1, got {self.actors}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise VlmrtError("--cpus-per-actor and --gpus-per-actor cannot be negative")
        if self.cpus_per_actor == 0 and self.gpus_per_actor == 0:
            raise VlmrtError("an actor must hold some CPU or GPU: give --cpus-per-actor or --gpus-per-actor above 0")

    @property
    def threads(self) -> int:
        """torch threads in an actor: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_actor))

    def check_device(self, device: str) -> None:
        """Refuse cuda without --gpus-per-actor: Ray gives no GPU to an actor that reserves none (it may
        place it on a node without one, and such actors would all share the first GPU unscheduled)."""
        if device.startswith("cuda") and self.gpus_per_actor == 0:
            raise VlmrtError(f"--device {device} with --ray needs GPUs per actor, e.g. --gpus-per-actor 1")

    def remote_args(self) -> dict:
        return {"num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor}


def import_ray():
    """The `ray` module with Ray Data, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pyarrow and pandas)
    except ImportError:
        raise VlmrtError(RAY_MISSING) from None
    return ray


@contextmanager
def ray_cluster(resources: RayResources):
    """Yield the `ray` module connected to the job's cluster; shut down only what this call started.

    Raises:
        VlmrtError: Ray is missing, the address cannot be reached, or the pool cannot fit the cluster.
    """
    ray = import_ray()
    started = not ray.is_initialized()  # a process that already called ray.init keeps its connection
    if started:
        address = resources.address or os.environ.get("RAY_ADDRESS") or "local"
        if address != "local":
            check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise VlmrtError(f"cannot join the Ray cluster at {address!r} ({e}); check --address or RAY_ADDRESS") from None
    try:
        _check_fits(ray.cluster_resources(), resources, local=started and ray_is_local(resources))
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # the command draws its own
        yield ray
    finally:
        if started:
            ray.shutdown()


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an address nothing listens at (`ray.init` would retry for minutes).

    Raises:
        VlmrtError: no TCP connection to the address's host and port within `timeout_s`.
    """
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise VlmrtError(f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT; check --address or RAY_ADDRESS")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise VlmrtError(f"cannot reach the Ray cluster at {address!r} ({e}); check --address or RAY_ADDRESS, "
                         "and that the cluster is up") from None


def ray_is_local(resources: RayResources) -> bool:
    return not (resources.address or os.environ.get("RAY_ADDRESS"))


def _check_fits(total: dict, resources: RayResources, local: bool) -> None:
    """A pool larger than the cluster waits forever: refuse it on a local cluster (which cannot grow);
    on a remote one an autoscaler may add nodes, so only warn."""
    short = [f"{resources.actors} x {per} {kind} but the cluster has {total.get(kind, 0):g}"
             for kind, per in (("CPU", resources.cpus_per_actor), ("GPU", resources.gpus_per_actor))
             if per > 0 and resources.actors * per > total.get(kind, 0)]
    if not short:
        return
    what = f"the actor pool asks for {'; '.join(short)}"
    if local:
        raise VlmrtError(f"{what}; lower --actors, --cpus-per-actor or --gpus-per-actor")
    print(f"vlmrt: note: {what}; the job waits until the cluster grows", file=sys.stderr)


def absolute(path: str | os.PathLike) -> str:
    """A path that exists here, made absolute so that actors (whose working folder differs) find it;
    anything else (a preset name) unchanged."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else str(path)


def run_actor_pool(ray, rows: list[dict], actor: type, constructor: dict, batch_size: int, resources: RayResources):
    """Stream `rows` through a pool of `actor`s in batches; yields each finished block as a dict of numpy columns.

    Args:
        ray: the connected `ray` module (`ray_cluster`).
        rows: one dict per work item (plain str/int/float values).
        actor: a class built once per actor with `constructor` keyword arguments and called with a
            batch {column: numpy array}, returning {column: numpy array}.
        batch_size: rows per call.
        resources: pool size and per-actor resources.
    """
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(rows).map_batches(
        actor, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=constructor,
        compute=ActorPoolStrategy(size=resources.actors), **resources.remote_args())
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as e:
        raise unwrap_error(e) from None


def run_task(ray, fn, resources: RayResources, *args):
    """fn(*args) run once on the cluster with one actor's resources (e.g. to read what the actors
    will build); returns its result."""
    try:
        return ray.get(ray.remote(**resources.remote_args())(fn).remote(*args))
    except Exception as e:
        raise unwrap_error(e) from None


def unwrap_error(e: BaseException) -> BaseException:
    """A `VlmrtError` raised inside an actor reaches the driver wrapped in Ray's task errors (whose
    text is a traceback): return a plain one with the original message, so the CLI prints one line;
    any other error unchanged."""
    chain, cur = [], e
    while cur is not None and all(cur is not c for c in chain):
        chain.append(cur)
        cur = getattr(cur, "cause", None) or cur.__cause__
    ours = [c for c in chain if isinstance(c, VlmrtError)]
    return VlmrtError(*ours[-1].args) if ours else e  # the last is the original, raised in the actor
