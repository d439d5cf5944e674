"""Several training processes under ``torchrun``: the process group and the few collectives the
loop needs.

``torchrun`` describes each process through environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without them, or with a world of one, nothing
here does anything and a run is the plain single-process run. Rank 0 is the main process: the
only one that talks to MLflow, writes checkpoints, registers the model and generates samples.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from medlm.errors import MedLMError


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise MedLMError(f"${name}={text!r} is not a whole number: expected the value torchrun "
                         "sets") from None


def environment_world_size() -> int:
    """Processes ``torchrun`` started (1 without torchrun)."""
    return _environment_int("WORLD_SIZE", 1)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device, timeout_min: float = 15.0) -> torch.device:
    """Join the process group ``torchrun`` set up (gloo on CPU, nccl on CUDA) and return this
    process's device (``cuda:LOCAL_RANK`` on GPUs). A single process gets ``device`` back.
    ``timeout_min``: how long a collective waits for the slowest process before the job fails
    (rank 0 scores and samples alone after each epoch while the others wait)."""
    if environment_world_size() <= 1:
        return device
    if not dist.is_available():
        raise MedLMError("torchrun started several processes but this PyTorch build has no "
                         "torch.distributed: expected a build with distributed support")
    if device.type == "mps":
        raise MedLMError("--device mps cannot train in several processes: expected cpu or cuda")
    if device.type == "cuda":
        local_rank = _environment_int("LOCAL_RANK", 0)
        if local_rank >= torch.cuda.device_count():
            raise MedLMError(f"LOCAL_RANK {local_rank} has no GPU (this node has "
                             f"{torch.cuda.device_count()}): expected --nproc_per_node <= the "
                             "GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
    return device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (or maxed) over all processes, in place; unchanged in one process."""
    if is_enabled():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_reduce_numbers(values: list[float], device: torch.device,
                       op: str = "sum") -> list[float]:
    """Host numbers (counts, sums, seconds) reduced over all processes, in float64."""
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device), op).tolist()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every process."""
    if not is_enabled():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any] | None:
    """Every process's ``value``, in rank order, on rank 0 (``None`` elsewhere)."""
    if not is_enabled():
        return [value]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
