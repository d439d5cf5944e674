"""``torchrun``'s processes: the process group and the collectives the loop needs; without
torchrun nothing here does anything. Rank 0, the main process, alone talks to MLflow, writes
checkpoints, registers the model and generates samples."""

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from medlm.errors import MedLMError


def _environment_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise MedLMError(f"${name}={os.environ[name]!r} is not a whole number: expected the "
                         "value torchrun sets") from None


def environment_world_size() -> int:
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
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); this process's device.
    ``timeout_min``: how long a collective waits (rank 0 scores alone after each epoch)."""
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


def stop(failed: bool = False) -> None:
    """Leave torchrun's process group. After a failure NCCL's is aborted: destroying it waits
    for every rank (PyTorch #122358), so one rank's error would hang the job for up to
    --collective-timeout; gloo's destroy is this process's alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not (failed and "nccl" in dist.get_backend()):
        dist.destroy_process_group()
    elif abort := getattr(dist.distributed_c10d, "_abort_process_group", None):  # torch 2.5+
        abort()  # (before, the process's exit tears the group down)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (or maxed) over all processes, in place; unchanged in one process."""
    if is_enabled():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_reduce_numbers(values: list[float], device: torch.device,
                       op: str = "sum") -> list[float]:
    """Host numbers reduced over all processes, in float64; as they are in one process (MPS,
    a single-process device, has no float64)."""
    if not is_enabled():
        return list(values)
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device), op).tolist()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every process."""
    box = [value]
    if is_enabled():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any] | None:
    """Every process's ``value``, in rank order, on rank 0 (``None`` elsewhere)."""
    if not is_enabled():
        return [value]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
