"""Orderly end of a multi-process run started by ``accelerate launch``.

A process that exits with the default process group still alive can abort *after* a successful run:
gloo's worker threads may still own tensors when the interpreter tears down, and the C++ runtime then
calls ``std::terminate`` ("terminate called without an active exception", SIGABRT, exit code -6 under
torchrun). Destroying the group is not enough: a DDP-wrapped model kept alive by a reference cycle (the
trainer's) still owns the gloo group and its threads until a garbage collection that, at exit, may come
too late. The entry points call :func:`end_process_group` once their work is done so that never happens.
"""

from __future__ import annotations

import gc

import torch.distributed as dist


def end_process_group() -> bool:
    """Wait for every rank, destroy the default process group, and collect what still holds it.

    Call it once the trainer (or wrapped model) is out of scope, so the collection frees the gloo
    threads while Python is fully alive. A no-op (returns ``False``) in a single process or when no group was initialized. Call it only on
    the success path: after an error on one rank, the barrier would wait for ranks that never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # frees DDP wrappers held only by cycles, and with them the gloo worker threads
    return True
