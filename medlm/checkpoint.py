"""Resumable training state, written after every epoch.

A checkpoint directory holds ``model.safetensors`` (the weights after the epoch),
``best.safetensors`` (the best epoch's weights so far) and ``state.pt`` (optimizer, scheduler,
GradScaler, RNG states, epoch results, early-stopping counter), loaded back with
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


def save_checkpoint(directory: str | os.PathLike, *, model, optimizer, scheduler, scaler,
                    epochs: list, best_state: dict | None, epochs_without_improvement: int,
                    loader_state: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    numpy_state = np.random.get_state()
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "epochs": [asdict(result) for result in epochs],
        "epochs_without_improvement": epochs_without_improvement,
        "loader": loader_state,
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


def load_checkpoint(directory: str | os.PathLike, model) -> dict:
    """Load the weights into ``model`` and return the rest of the state (RNGs restored)."""
    directory = Path(directory)
    if not (directory / "state.pt").is_file():
        raise MedLMError(f"no checkpoint in {str(directory)!r}: expected a directory written "
                         "after a completed epoch")
    load_model(model, str(directory / "model.safetensors"))
    state = torch.load(directory / "state.pt", weights_only=True)
    best = directory / "best.safetensors"
    state["best_state"] = load_file(str(best)) if best.is_file() else None
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_tuples(state["python_rng"]))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return state


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def saved_epochs(directory: str | os.PathLike) -> list[dict]:
    """The epoch results recorded in a checkpoint, without loading any weights."""
    return torch.load(Path(directory) / "state.pt", weights_only=True)["epochs"]
