"""Tensor parallelism for the decoder on torch.distributed (docs/tp.md).

```
 group.py    the process group (gloo | nccl, timeouts) and rank 0's message channel
 shard.py    column/row-parallel slices of every decoder layer (fp, int8, fp16/bf16 weights)
 runtime.py  LeaderRuntime (rank 0) and follow() (the other ranks)
 launch.py   --tp N on the command line: start or join the ranks, run the command on rank 0
```

The package imports nothing itself: `vlmrt.runtimes.build_runtime` asks `vlmrt.tp.group` whether a
group is active on every runtime build, and that must not pull the model code (vlmrt.models) into an
export-only process.
"""
