"""Resumable training state: one ``state.pt`` per run, replaced whole (``_replace``) after every
epoch, before its loggers run. It holds the weights training changes (LoRA: the adapters alone),
the best epoch's when not those, and ``medlm.train.TrainState`` with every process's RNG states."""

import contextlib
import errno
import hashlib
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from medlm import distributed
from medlm._paths import lock_file
from medlm.errors import DiskFull, MedLMError, first_line

log = logging.getLogger(__name__)

STATE = "state.pt"
# 4: a sampled base fingerprint and the GPU state of each process's own device; 3 (the whole
# base hashed, every visible GPU's state) read but for LoRA runs; 2 (epoch-N/ directories named
# by ``latest``) and 1 refused
FORMAT = 4
OWNER = ".owner"  # in a checkpoint directory: locked by the process that trains the run
_owned: dict[Path, int] = {}  # the checkpoint directories this process trains, and their locks


def rng_state() -> dict:
    """This process's random states; of the GPUs', that of the one it trains on (a torchrun
    rank's ``cuda:LOCAL_RANK``): a resume may see the GPUs numbered otherwise."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": (torch.cuda.get_rng_state(torch.cuda.current_device())
                     if torch.cuda.is_available() else None),
            "python": random.getstate(),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None}


def restore_rng(state: dict) -> None:
    """Restore ``rng_state()``; its GPU state to the GPU this process trains on now."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # format 3: every visible GPU's, by index
        index = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
    if state["mps"] is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(directory: str | os.PathLike, model, state: dict,
                    best_weights: dict | None, rng_states: list[dict] | None = None) -> None:
    """Replace the checkpoint in ``directory``; ``rng_states``: every process's in rank order
    (default: this one's). A full disk is one line, the previous checkpoint kept."""
    directory, epoch = Path(directory), len(state["epochs"])
    payload = {**state, "weights": trained_weights(model),
               "best_weights": None if state["best_is_current"] else best_weights,
               "rng": rng_states or [rng_state()], "format": FORMAT}
    for stale in directory.glob(f"{STATE}.*.partial"):  # a write a SIGKILL cut short
        stale.unlink(missing_ok=True)  # (the directory is this process's: trained_here)
    try:
        _replace(directory / STATE, lambda partial: torch.save(payload, partial))
    except Exception as error:
        if not disk_full(error):
            raise
        kept = (f"the last good checkpoint, epoch {epoch - 1}, is kept in {directory}"
                if (directory / STATE).is_file() else "")
        raise DiskFull(f"no space left on device in {directory.parent} (epoch {epoch}'s "
                       f"checkpoint of run {directory.name} could not be written, and what it "
                       "had written is removed)", kept) from None


def disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError | SafetensorError) and any(  # torch: a short write
        words in str(error) for words in ("No space left on device", "unexpected pos",
                                          "file write failed", "StorageFull"))


def claim(directory: str | os.PathLike) -> None:
    """This process trains the run (or sweep) in ``directory`` until it ends, even by SIGKILL
    (the lock goes with the process): a second trainer is refused in one line. Where no lock
    can be taken it goes on without."""
    directory = Path(directory).absolute()
    if directory in _owned:
        return
    try:
        lock = lock_file(directory / OWNER, wait=False)
    except BlockingIOError:
        raise MedLMError(f"run {directory.name} is being trained by another process (its "
                         f"checkpoint {directory} is in use): expected that process to end "
                         "first, then --resume it if it was stopped") from None
    if lock is not None:
        _owned[directory] = lock


@contextlib.contextmanager
def trained_here(directory: str | os.PathLike) -> Iterator[None]:
    """``claim`` for a run: one that stops lets go (its checkpoint kept); one that finishes
    keeps it until ``remove_finished``."""
    claim(directory)
    try:
        yield
    except BaseException:
        let_go(directory)
        raise


def remove_finished(directory: str | os.PathLike) -> None:
    """The run has ended: its checkpoint removed, then let go (a resume in between finds none)."""
    shutil.rmtree(directory, ignore_errors=True)
    let_go(directory)


def let_go(directory: str | os.PathLike) -> None:
    lock = _owned.pop(Path(directory).absolute(), None)
    if lock is not None:
        os.close(lock)


def trained_weights(model) -> dict[str, torch.Tensor]:
    """The weights training changes: every parameter, or LoRA's adapters alone."""
    return {name: parameter.detach() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


FINGERPRINT_STRIDE = 1024  # frozen_sha256 hashes every 1,024th element of each frozen weight


def frozen_sha256(model) -> str | None:
    """Fingerprint of the weights training leaves alone (LoRA's base), which a checkpoint does
    not hold: a resume on other ones would train another model. Each one's name, shape, dtype
    and every ``FINGERPRINT_STRIDE``-th element, sampled on its device: a base of another file
    or revision differs in essentially every weight, and all of a 1B+ base would be gigabytes
    copied to the host and hashed at every run start. None where there are none."""
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    digest = hashlib.sha256()
    for name, parameter in frozen:
        digest.update(f"{name} {tuple(parameter.shape)} {parameter.dtype}".encode())
        sample = parameter.detach().flatten()[::FINGERPRINT_STRIDE]
        # gathered on the device, the sample alone copied to the host (contiguous() would keep
        # a one-element slice's stride, which view refuses)
        sample = sample.clone(memory_format=torch.contiguous_format).cpu()
        digest.update(sample.view(torch.uint8).numpy())
    return digest.hexdigest() if frozen else None


def load_trained_weights(model, weights: dict[str, torch.Tensor]) -> None:
    missing = set(trained_weights(model)) - set(weights)
    unexpected = set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise MedLMError(f"the checkpoint's weights do not fit this model (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): expected "
                         "the model (and --lora-rank) the run was trained with")
    model.load_state_dict(weights, strict=False)


def write_durably(path: str | os.PathLike, text: str) -> None:
    """Replace a small file in one step (``_replace``)."""
    _replace(Path(path), lambda partial: partial.write_text(text))


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a ``.partial`` file, flush it to disk, then rename it to ``path`` in one step:
    a kill or a power loss leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # two writers of one file
    try:
        write(partial)
        _fsync(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # a failed write leaves nothing behind
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory where the OS lets one be opened, to disk."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / STATE).is_file() or (Path(directory) / "latest").is_file()


def load_checkpoint(directory: str | os.PathLike, model, frozen: str | None = None,
                    precision=None) -> dict:
    """Load the trained weights into ``model``, restore this process's RNGs and return the rest
    for ``TrainState.load_state_dict`` (``best_weights`` on the main process alone). ``frozen``
    (the model's ``frozen_sha256``) must be the checkpoint's; another ``precision`` is warned of."""
    state = _load(directory)
    check_world_size(directory, distributed.world_size(), len(state["rng"]))
    if state["format"] == 3 and state["frozen_sha256"] is not None:  # hashed otherwise
        raise MedLMError(f"the checkpoint {directory} of a LoRA run was written by an older "
                         "MedLM (format 3, which fingerprinted the frozen base otherwise): "
                         "expected one of this version: finish the run with the MedLM that "
                         "started it, or start it again")
    if state["frozen_sha256"] != frozen:
        raise MedLMError(f"the checkpoint in {str(directory)!r} was trained on other frozen "
                         "base weights than the model loaded now (its file or Hub revision "
                         "changed): expected the base the run started from")
    if precision is not None and state["precision"] != precision.numerics:
        log.warning("WARNING: resuming in %s on %s; the epochs before were trained in %s (another "
                    "machine): the losses from here on are not bit-for-bit those of an "
                    "uninterrupted run", precision.numerics, precision.device_type,
                    state["precision"])
    load_trained_weights(model, state["weights"])
    best = state["weights"] if state["best_is_current"] else state["best_weights"]
    state["best_weights"] = best if distributed.is_main() else None
    restore_rng(state["rng"][distributed.rank()])
    return state


def check_world_size(directory: str | os.PathLike, world_size: int,
                     saved: int | None = None) -> None:
    """A run goes on with as many processes as it was trained with (``saved``, read from the
    checkpoint when not given): the batches each process draws depend on it."""
    saved = saved or len(_load(directory, mmap=True)["rng"])
    if saved != world_size:
        raise MedLMError(f"the checkpoint in {str(directory)!r} was written by {saved} training "
                         f"process(es), not {world_size}: expected to resume with {saved} "
                         "(torchrun's processes in all; 1 = no torchrun)")


def saved_epochs(directory: str | os.PathLike) -> list[dict]:
    """The epoch results recorded in a checkpoint, without loading any weights."""
    return _load(directory, mmap=True)["epochs"]


def _load(directory: str | os.PathLike, mmap: bool = False) -> dict:
    """The checkpoint's state, on the CPU (one written on a GPU resumes on a CPU-only machine,
    and no torchrun rank deserialises onto cuda:0); a damaged or older one is one line."""
    path = Path(directory) / STATE
    if not has_checkpoint(directory):
        raise MedLMError(f"no checkpoint in {str(directory)!r}: expected a directory written "
                         "after a completed epoch")
    try:  # format 2 (epoch-N/ directories named by ``latest``) has no state.pt
        state = (torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
                 if path.is_file() else {"format": 2})
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        reason = "an empty file" if not path.stat().st_size else first_line(error)[:200]
        raise MedLMError(f"the checkpoint file {path} is damaged ({reason}): expected a "
                         "whole file, as the run wrote it: start the run again") from None
    if state.get("format") not in (3, FORMAT):
        raise MedLMError(f"the checkpoint {path.parent} was written by an older MedLM (format "
                         f"{state.get('format', 1)}, not {FORMAT}): expected one of this version: "
                         "finish the run with the MedLM that started it, or start it again")
    return state
