"""PyTorch modules as JAX functions, through `torchax`: the one place that imports jax and torchax.

```
 torch nn.Module ─► torchax.extract_jax ─► (weights: a pytree of jax arrays, fn(weights, args))
                                              │ jax.jit(fn): traced once per input shape, XLA-compiled
 torch tensors ─► numpy ─► jax arrays ─► jitted fn ─► jax arrays ─► numpy ─► torch tensors
```

torchax 0.0.13 names, at import, aten overloads that torch 2.13 no longer has (the named-dimension
ones, e.g. `aten.prod.dim_Dimname`), and stops there. `import_torchax` imports it with missing
overload names resolving to inert placeholders: they only fill torchax's tables (decompositions to
register, autocast policies), which torch then never looks up, because no such op is ever dispatched.
Importing torchax also turns off PyTorch's fast path of `nn.MultiheadAttention` in this process
(the eager reference then runs its plain path: the same results up to rounding).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch

from vlmrt.errors import VlmrtError

EXTRA_HINT = "install the extra: pip install 'vlmrt[jax]' (jax[cpu] and torchax)"


class MissingOverload:
    """Stands for an overload this torch does not have (never equal to a real op)."""

    def __init__(self, packet: str, name: str):
        self.name = f"{packet}.{name}"

    def __repr__(self) -> str:
        return f"<missing aten overload {self.name}>"


@contextlib.contextmanager
def _tolerate_missing_overloads():
    packet_cls = torch._ops.OpOverloadPacket
    original = packet_cls.__getattr__

    def lookup(self, key):
        try:
            return original(self, key)
        except AttributeError:
            if key.startswith("__"):
                raise
            return MissingOverload(self._qualified_op_name, key)

    packet_cls.__getattr__ = lookup
    try:
        yield
    finally:
        packet_cls.__getattr__ = original


def import_jax():
    """(jax, torchax), or a VlmrtError naming the extra when either is not installed."""
    try:
        import jax
    except ImportError:
        raise VlmrtError(f"--runtime jax needs JAX; {EXTRA_HINT}") from None
    os.environ.setdefault("ENABLE_RUNTIME_UPTIME_TELEMETRY", "0")  # torchax turns it on unless set
    warnings.filterwarnings("ignore", message="Explicitly requested dtype int64")  # ids as int32: expected
    try:
        with _tolerate_missing_overloads():
            import torchax
            torchax.default_env()  # builds the op tables (decompositions.py) under the same tolerance
    except ImportError:
        raise VlmrtError(f"--runtime jax needs torchax; {EXTRA_HINT}") from None
    _keep_torch_accelerator_off(torchax)
    return jax, torchax


def _keep_torch_accelerator_off(torchax) -> None:
    """torchax registers its device module as torch's PrivateUse1 backend "jax", whose
    `is_available()` says True; `torch.accelerator` then takes it for this process's accelerator,
    and torch.compile (dynamo asks `torch.accelerator.current_stream()` on every trace) fails with
    "PyTorch is not linked with support for jax devices". torchax itself never asks: JAX places its
    own arrays. So the module says unavailable, and the compiled runtime keeps working in a process
    that also ran the jax one."""
    torchax.device_module.is_available = lambda: False


def to_jax(value):
    """A torch tensor (or numpy array) -> a jax array on the default device; int64 stays int64 only
    with jax_enable_x64 (else int32: ids, positions and slots all fit)."""
    import jax.numpy as jnp

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return jnp.asarray(value)


def to_torch(value) -> torch.Tensor:
    """A jax array -> a torch tensor (a host copy; int32 ids become int64)."""
    arr = np.array(value)
    t = torch.from_numpy(arr)
    return t.long() if t.dtype == torch.int32 else t
