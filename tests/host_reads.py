"""``no_host_reads()``: make any read of a tensor's value by Python fail, to prove that a loop
never waits for the device (DESIGN.md: value checks run once per loop, never per step on a GPU).

On a GPU, Python reading a tensor's value (``t.item()``, ``int(t)``, ``if t:``, ``t.tolist()``)
copies it to the host and waits for every queued kernel: a sync that stalls the launch queue
and breaks CUDA-graph capture. On the CPU nothing waits, so such reads go unseen in CPU tests;
this context manager makes them raise there too, so a CPU test can prove a loop free of them.

Usage::

    from host_reads import no_host_reads

    with no_host_reads():
        x = step(x)  # raises HostReadError at the first read of a tensor's value

Typical use: warm up first (the first step may check its inputs once, compile, capture), then
run the remaining steps under the context, e.g. entered from a callback after step 0 with a
``contextlib.ExitStack``. Compare results after leaving it: ``torch.equal``,
``torch.testing.assert_close`` and printing tensors read values and raise inside.

What raises inside:
- on every device, Python-level value reads: ``Tensor.item``, ``tolist``, ``numpy`` (and so
  ``np.asarray(t)``), ``int(t)``, ``float(t)``, ``complex(t)``, ``bool(t)`` (``if t:``,
  ``while t:``, ``t in ...``), ``operator.index(t)`` (a tensor used as a Python int: ``range(t)``,
  a list index), formatting a 0-dim tensor (``f"{t:.3f}"``), ``torch.equal`` / ``allclose`` /
  ``is_nonzero`` and their Tensor methods (they return Python bools);
- on CUDA, when ``cuda_sync_debug`` (the default), everything that synchronises the host with
  the device through torch: ``torch.cuda.set_sync_debug_mode("error")`` for the duration, which
  also catches what the patches cannot see: C++ ops whose output shape depends on the data
  (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``), copies to the host
  (``.cpu()``, ``.to("cpu")``), copies from pageable host memory, ``torch.cuda.synchronize()``.
  ``torch.cuda.graph(...)`` synchronises when it begins capturing: capture before entering.

What does not raise (and why):
- metadata: shapes, strides, dtype, device, ``numel()``, ``len(t)``, ``t.dim()``: known on the
  host without reading data;
- tensor-valued ops (``t.any()``, ``torch.where``, comparisons): their results stay tensors;
- on the CPU, C++ ops that read data internally (``nonzero``, boolean masks, ``torch.quantile``):
  torch's C++ does not go through these Python methods. Run the CUDA variant of a test to cover
  them.

``allow``: a predicate ``allow(tensor) -> bool`` for tensors whose values may be read, for host
tensors that stay on the host on a GPU run too, where a read costs no sync. For example
``torch.optim.AdamW`` (not ``fused``/``capturable``) keeps each parameter's ``step`` as a CPU
scalar and reads it with ``.item()`` every step, even for CUDA parameters::

    steps = {id(s["step"]) for s in optimizer.state.values()}
    with no_host_reads(allow=lambda t: id(t) in steps):
        trainer.train_step(batches)

Python reads of ``torch.Tensor`` values are patched on the class for the duration: process-wide,
all threads. Nesting is fine (each level restores what it found).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Tensor methods that hand a tensor's value to Python, and what the error calls them.
TENSOR_READS = {
    "item": "Tensor.item()",
    "tolist": "Tensor.tolist()",
    "numpy": "Tensor.numpy()",
    "__int__": "int(tensor)",
    "__float__": "float(tensor)",
    "__complex__": "complex(tensor)",
    "__bool__": "bool(tensor) (if / while / and / or on a tensor)",
    "__index__": "operator.index(tensor) (a tensor used as a Python int)",
    "equal": "Tensor.equal()",
    "allclose": "Tensor.allclose()",
    "is_nonzero": "Tensor.is_nonzero()",
}
# torch functions that return a Python value computed from tensor data.
TORCH_READS = {"equal": "torch.equal()", "allclose": "torch.allclose()", "is_nonzero": "torch.is_nonzero()"}
_ABSENT = object()


class HostReadError(RuntimeError):
    """A tensor's value was read on the host inside ``no_host_reads()``."""


@contextlib.contextmanager
def no_host_reads(
    *, allow: Callable[[torch.Tensor], bool] | None = None, cuda_sync_debug: bool = True
) -> Iterator[None]:
    """Raise ``HostReadError`` where Python reads a tensor's value (see the module docstring for
    what is caught where); on CUDA also ``torch.cuda.set_sync_debug_mode("error")``.

    Args:
        allow: ``allow(tensor) -> bool``: True lets that tensor's value be read (host-side
            tensors whose reads cost no sync on a GPU run either). Default: no tensor.
        cuda_sync_debug: also turn torch's CUDA sync debug mode to "error" when CUDA is
            available (a sync then raises RuntimeError); restored on exit.
    """
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        own = owner.__dict__.get(name, _ABSENT)  # absent: inherited (torch._C.TensorBase's)

        def guard(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if allow is not None and tensors and all(allow(t) for t in tensors):
                return original(*args, **kwargs)
            what = ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in tensors)
            raise HostReadError(
                f"{label} read a tensor's value on the host ({what}) inside no_host_reads(): on a GPU "
                "this waits for the device. Read it once before the loop, or keep it on the device."
            )

        saved.append((owner, name, own))
        setattr(owner, name, guard)

    for name, label in TENSOR_READS.items():
        patch(torch.Tensor, name, label)
    for name, label in TORCH_READS.items():
        patch(torch, name, label)
    sync_debug = cuda_sync_debug and torch.cuda.is_available()
    old_mode = torch.cuda.get_sync_debug_mode() if sync_debug else None
    try:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode(old_mode)
        for owner, name, own in reversed(saved):
            if own is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
