"""Running a CLI command with --tp N: join (or start) the group, rank 0 runs the command, the other
ranks follow it.

```
 vlmrt run ... --tp 2                          torchrun --nproc-per-node 2 -m vlmrt run ... --tp 2
   this process = rank 0 ─┐                      every rank: RANK, WORLD_SIZE, MASTER_* from torchrun
   spawns ranks 1..N-1:   │  python -m vlmrt <same argv>, RANK=r, MASTER_ADDR=127.0.0.1, a free port
                          ▼
 init_group ─► rank 0: the command (its LeaderRuntime sends every decoder call) ─► "stop"
           └─► rank r: follow() until "stop"; prints nothing but its errors
```
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from vlmrt.errors import VlmrtError


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, argv: list[str]) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 as `python -m vlmrt ARGV` on this machine and make this process rank 0
    (loopback MASTER_ADDR, a free port). Followers' stdout is dropped: rank 0 alone prints."""
    port = str(free_port())
    base = {"TORCH_CPP_LOG_LEVEL": "ERROR",  # our own one-line error says it; no C++ stack dump besides
            **os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    children = []
    for rank in range(1, world):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        children.append(subprocess.Popen([sys.executable, "-m", "vlmrt", *argv], env=env, stdout=subprocess.DEVNULL))
    os.environ.update({k: base[k] for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}, RANK="0", LOCAL_RANK="0")
    return children


def reap(children: list[subprocess.Popen], timeout_s: float) -> int:
    """Wait for the ranks this process started (killing one still alive after `timeout_s`); the
    first non-zero exit code among them, else 0."""
    codes = []
    for p in children:
        try:
            codes.append(p.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return next((c for c in codes if c), 0)


def run_parallel(args, argv: list[str]) -> int:
    """Run `args.func(args)` as rank 0 of a group of `args.tp` ranks (the others follow); ranks are
    started here unless torchrun (or another launcher) already did.

    Args:
        args: the parsed command line (`tp`, `tp_timeout`, `device`, `func`).
        argv: the command line itself, for the ranks started here.
    """
    import torch

    from vlmrt.tp.group import check_devices, close_group, env_rank, init_group
    from vlmrt.tp.runtime import RUNTIMES

    if isinstance(getattr(args, "runtime", None), str) and args.runtime not in RUNTIMES:  # bench checks its list
        raise VlmrtError(f"--tp {args.tp} runs on --runtime {' or '.join(RUNTIMES)}, not {args.runtime}; "
                         "use one of them or --tp 1")
    device = getattr(args, "device", "cpu")
    check_devices(args.tp, torch.device(device))  # before any rank starts
    children = spawn_ranks(args.tp, argv) if env_rank() is None else []
    try:
        try:
            group = init_group(args.tp, device, args.tp_timeout)
        except BaseException:
            for p in children:  # they cannot form a group without this rank: stop them now, not at the timeout
                p.kill()
            raise
        code = _as_rank(args, group)
    finally:
        close_group()
        others = reap(children, args.tp_timeout) if children else 0
    return code or others


def _as_rank(args, group) -> int:
    from vlmrt.tp.runtime import follow, stop_followers

    if not group.leader:
        follow(group)
        return 0
    try:
        return args.func(args)
    finally:
        try:
            stop_followers(group)
        except VlmrtError:
            pass  # the followers are gone already; the command's own error says why
