"""Detectron2's ``launch`` that also runs without CUDA: N CPU processes with the gloo backend.

Detectron2 v0.6's launcher hard-codes NCCL and asserts CUDA; main's picks gloo without GPUs. This
:func:`launch` has the same API and works with both: with CUDA it is Detectron2's ``launch`` unchanged
(NCCL, one process per GPU); without, it spawns ``num_gpus_per_machine`` CPU processes itself.
:func:`create_ddp_model` / :func:`cpu_ddp` let ``DefaultTrainer`` wrap a CPU model in
``DistributedDataParallel`` (Detectron2 passes ``device_ids=[local_rank]``, which DDP rejects for CPU modules).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.engine.launch import launch as _d2_launch
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch", "create_ddp_model", "cpu_ddp"]

logger = logging.getLogger(__name__)


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str | None = None, args: tuple = (), timeout=DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines`` machines.

    Call it on every machine, as Detectron2's ``launch`` (same arguments; ``dist_url="auto"`` picks a free
    local port, single machine only). With CUDA available, or a single process, this *is* Detectron2's
    ``launch``. Otherwise each process joins a gloo process group, Detectron2's per-machine (local) process
    group is created, and, unless ``OMP_NUM_THREADS`` is set, the machine's cores are divided among the
    processes.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1 or torch.cuda.is_available():
        return _d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                          dist_url=dist_url, args=args, timeout=timeout)
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(_spawned_cpu_worker, nprocs=num_gpus_per_machine, daemon=False,
             args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout))


def _spawned_cpu_worker(*args) -> None:
    """:func:`_cpu_worker` in a spawned process that, once it succeeded, exits without interpreter teardown.

    Even with the process group destroyed, gloo's threads (and objects such as a DDP reducer that a reference
    cycle keeps until the final garbage collection) can be torn down by static destructors at exit, which
    then abort ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489), and
    ``mp.spawn`` reports a run that succeeded as crashed. A failure still raises, so ``mp.spawn`` reports it.
    """
    _cpu_worker(*args)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(0)


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs_per_machine))
    try:
        dist.init_process_group("gloo", init_method=dist_url, world_size=world_size,
                                rank=machine_rank * procs_per_machine + local_rank, timeout=timeout)
    except Exception:
        logger.error("Process group URL: %s", dist_url)
        raise
    try:
        _create_local_process_group(procs_per_machine)
        comm.synchronize()  # as Detectron2: avoids a possible timeout right after init_process_group
        main_func(*args)
        comm.synchronize()  # no rank tears down while another still talks to it
    finally:
        gc.collect()  # DDP models in reference cycles release their process-group handles now
        dist.destroy_process_group()  # gloo's threads must not outlive the interpreter (see above)


def _create_local_process_group(procs_per_machine: int) -> None:
    """Detectron2's group of the ranks on this machine (``comm.get_local_rank()`` etc. need it)."""
    if hasattr(comm, "create_local_process_group"):  # Detectron2 after v0.6
        comm.create_local_process_group(procs_per_machine)
        return
    assert comm._LOCAL_PROCESS_GROUP is None  # v0.6: a module attribute, set by its launch
    machine = dist.get_rank() // procs_per_machine
    for i in range(dist.get_world_size() // procs_per_machine):  # every rank must create every group
        group = dist.new_group(list(range(i * procs_per_machine, (i + 1) * procs_per_machine)))
        if i == machine:
            comm._LOCAL_PROCESS_GROUP = group


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model``, except that a CPU model gets ``DistributedDataParallel`` without
    ``device_ids`` (Detectron2 passes ``[local_rank]``, valid for CUDA models only)."""
    if "device_ids" not in kwargs and all(p.device.type == "cpu" for p in model.parameters()):
        kwargs["device_ids"] = None
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def cpu_ddp():
    """Within this block, ``DefaultTrainer.__init__`` wraps models with :func:`create_ddp_model`."""
    from detectron2.engine import defaults

    saved, defaults.create_ddp_model = defaults.create_ddp_model, create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = saved
