"""Resumable training state, written after every epoch.

A checkpoint directory holds ``model.safetensors`` (the weights after the epoch),
``best.safetensors`` (the best epoch's weights so far) and ``state.pt`` (optimizer, scheduler,
GradScaler, every process's RNG states, epoch results, early-stopping counter), loaded back with
``torch.load(weights_only=True)``. Files are written beside their final name and renamed, so a
kill mid-write leaves the previous epoch's checkpoint intact.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from medlm.errors import MedLMError


def rng_state() -> dict:
    """This process's random number generators (dropout, shuffles, sampling)."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(directory: str | os.PathLike, *, model, optimizer, scheduler, scaler,
                    epochs: list, best_state: dict | None, epochs_without_improvement: int,
                    loader_state: dict, rng_states: list[dict] | None = None,
                    precision: str | None = None) -> None:
    """``rng_states``: one per process, in rank order (default: this process's only);
    ``precision``: the effective one (fp32/bf16/fp16), checked when the run resumes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_states or [rng_state()],
        "epochs": [asdict(result) for result in epochs],
        "epochs_without_improvement": epochs_without_improvement,
        "loader": loader_state,
        "precision": precision,
    }
    _atomic(directory / "model.safetensors", lambda path: save_model(model, path))
    if best_state is not None:
        _atomic(directory / "best.safetensors",
                lambda path: save_file({k: v.contiguous() for k, v in best_state.items()}, path))
    _atomic(directory / "state.pt", lambda path: torch.save(state, path))


def _atomic(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(str(partial))
    os.replace(partial, path)


def load_checkpoint(directory: str | os.PathLike, model, rank: int = 0,
                    world_size: int = 1) -> dict:
    """Load the weights into ``model``, restore process ``rank``'s RNGs and return the rest of
    the state. A run continues with as many processes as it was trained with (the batches each
    process draws depend on it)."""
    directory = Path(directory)
    if not (directory / "state.pt").is_file():
        raise MedLMError(f"no checkpoint in {str(directory)!r}: expected a directory written "
                         "after a completed epoch")
    # map_location: a checkpoint written on a GPU resumes on a CPU-only machine, and no torchrun
    # rank deserialises onto cuda:0; the optimizer moves its state to the parameters' device.
    state = _upgrade(torch.load(directory / "state.pt", weights_only=True, map_location="cpu"))
    _check_world_size(directory, len(state["rng"]), world_size)
    load_model(model, str(directory / "model.safetensors"))
    best = directory / "best.safetensors"
    state["best_state"] = load_file(str(best)) if best.is_file() else None
    restore_rng(state["rng"][rank])
    return state


def check_world_size(directory: str | os.PathLike, world_size: int) -> None:
    """A run continues with as many processes as it was trained with."""
    state = _upgrade(torch.load(Path(directory) / "state.pt", weights_only=True, mmap=True,
                                map_location="cpu"))
    _check_world_size(directory, len(state["rng"]), world_size)


def _check_world_size(directory, saved_world_size: int, world_size: int) -> None:
    if saved_world_size != world_size:
        raise MedLMError(f"the checkpoint in {str(directory)!r} was written by "
                         f"{saved_world_size} training process(es), not {world_size}: expected "
                         f"to resume with {saved_world_size} (torchrun's processes in all; 1 = "
                         "no torchrun)")


def _upgrade(state: dict) -> dict:
    """Checkpoints written before torchrun support kept one process's RNGs as top-level keys."""
    if "rng" not in state:
        state["rng"] = [{name: state.pop(f"{name}_rng")
                         for name in ("torch", "cuda", "python", "numpy")}]
    return state


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def saved_epochs(directory: str | os.PathLike) -> list[dict]:
    """The epoch results recorded in a checkpoint, without loading any weights."""
    return torch.load(Path(directory) / "state.pt", weights_only=True, mmap=True)["epochs"]
