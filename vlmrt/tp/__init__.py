"""Tensor parallelism for the decoder on torch.distributed (docs/tp.md).

```
 group.py    the process group (gloo | nccl, timeouts) and rank 0's message channel
 shard.py    column/row-parallel slices of every decoder layer (fp, int8, fp16/bf16 weights)
 runtime.py  LeaderRuntime (rank 0) and follow() (the other ranks)
 launch.py   --tp N on the command line: start or join the ranks, run the command on rank 0
```
"""

from vlmrt.tp.group import TPGroup, active, close_group, init_group
from vlmrt.tp.shard import check_plan, shard_model

__all__ = ["TPGroup", "active", "check_plan", "close_group", "init_group", "shard_model"]
