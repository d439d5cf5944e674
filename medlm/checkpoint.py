"""Resumable training state, written after every epoch, consistent as a whole.

A run's checkpoint directory holds one complete epoch, ``epoch-N/``: ``model.safetensors`` (the
weights training changes, after the epoch: every weight in full fine-tuning, only the adapters
with LoRA, whose frozen base is loaded again from the model's source on resume),
``best.safetensors`` (the best epoch's, when that is not this epoch: an improving epoch writes
its weights once, an epoch that does not improve links the previous epoch's) and ``state.pt``
(``medlm.train.TrainState``: optimizer, scheduler, GradScaler, every process's RNG states, epoch
results, early-stopping counter, effective precision), loaded back with
``torch.load(weights_only=True)``. An epoch is written into a hidden ``.epoch-N.partial/``
directory, renamed to ``epoch-N/`` in one step, and only then named by the ``latest`` file (itself
replaced atomically); the previous epoch's directory is removed last. A kill at any moment
leaves ``latest`` naming a complete epoch: never the weights of one epoch with the optimizer
state of another.

The checkpoint is written before the epoch's loggers (metrics, symptom scores, samples) run:
a run killed in between logs, when it resumes, what the tracking store lacks of that epoch
(``medlm.recipe``). A checkpoint holds its ``FORMAT``: one written by an older MedLM, with
another layout, is refused in one line, not read by guesswork.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medlm import distributed
from medlm._paths import lock_file
from medlm.errors import DiskFull, MedLMError, first_line

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """This process's random number generators (dropout, shuffles, sampling)."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
    }


def _restore_cuda_rng(states: list) -> None:
    """One saved generator state per GPU the run saw: those that this machine's visible GPUs
    can take are restored (``set_rng_state_all`` fails on fewer GPUs: a smaller slot, another
    ``CUDA_VISIBLE_DEVICES``), the rest are reported."""
    visible = torch.cuda.device_count()
    for device, saved in enumerate(states[:visible]):
        torch.cuda.set_rng_state(saved, device)
    if len(states) != visible:
        log.warning("WARNING: the checkpoint holds the random state of %d GPU(s) and %d are "
                    "visible now: %s; random draws on the GPU (dropout) are not those of an "
                    "uninterrupted run", len(states), visible,
                    f"restored the first {min(len(states), visible)}")


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        _restore_cuda_rng(state["cuda"])
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


FORMAT = 2  # the layout below; a checkpoint of another format is refused (``_torch_load``)


def save_checkpoint(directory: str | os.PathLike, model, state: dict,
                    best_weights: dict | None, rng_states: list[dict] | None = None) -> None:
    """Write epoch ``len(state["epochs"])``'s checkpoint into ``.epoch-N.partial/``, then
    publish it: ``model``'s trained weights, ``state`` (``medlm.train.TrainState.state_dict``)
    with ``rng_states`` (every process's, in rank order; default: this process's), and the best
    epoch's weights, not written when they are the model's (``state["best_is_current"]``) and
    linked from the previous epoch's checkpoint when the best epoch is unchanged. A disk that
    fills up meanwhile is one line (``DiskFull``), the previous epoch's checkpoint left whole."""
    epochs = len(state["epochs"])
    directory, name = Path(directory), f"epoch-{epochs}"
    partial = directory / f".{name}.partial"
    with _no_partial_epoch_on_full_disk(directory, partial):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a kill during an earlier attempt
        partial.mkdir()
        save_file({key: tensor.contiguous() for key, tensor in trained_weights(model).items()},
                  str(partial / "model.safetensors"))
        previous = directory / f"epoch-{epochs - 1}"
        if (best_weights is not None and not state["best_is_current"]
                and not _link_best(previous, partial)):
            save_file({k: v.contiguous() for k, v in best_weights.items()},
                      str(partial / "best.safetensors"))
        torch.save({**state, "rng": rng_states or [rng_state()], "format": FORMAT},
                   partial / "state.pt")
        _publish(directory, partial, name)


# what torch (a short write: "unexpected pos N vs M") and safetensors say for a full disk
DISK_FULL_WORDS = ("No space left on device", "unexpected pos", "file write failed",
                   "StorageFull")


def disk_full(error: BaseException) -> bool:
    """Did a write fail for want of space (or of quota)?"""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return (isinstance(error, RuntimeError | SafetensorError)
            and any(words in str(error) for words in DISK_FULL_WORDS))


@contextlib.contextmanager
def _no_partial_epoch_on_full_disk(directory: Path, partial: Path) -> Iterator[None]:
    """An epoch becomes the one to resume from only once written whole (``_publish``): a disk
    that fills up before leaves the last good epoch as it was; what the new one had written is
    removed, and the error (``DiskFull``) says where and what is kept."""
    try:
        yield
    except Exception as error:
        if not disk_full(error):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        kept = current_epoch_directory(directory)
        epoch = partial.name.removeprefix(".").removesuffix(".partial").replace("-", " ")
        raise DiskFull(f"no space left on device in {directory.parent} ({epoch}'s checkpoint "
                       f"of run {directory.name} could not be written, and what it had written "
                       "is removed)",
                       f"the last good checkpoint, {kept.name.replace('-', ' ')}, is kept in "
                       f"{kept}" if kept is not None else "") from None


OWNER = ".owner"  # in a checkpoint directory: locked by the process that trains the run
_owned: dict[Path, int] = {}  # the checkpoint directories this process trains, and their locks


def claim(directory: str | os.PathLike) -> None:
    """This process trains the run (or sweep) checkpointed in ``directory`` from now until it
    ends, even by SIGKILL (the lock goes with the process): a second process that would train
    it too, a ``--resume`` while the run still goes on or two at once, is refused in one line
    instead of logging every epoch twice. Where no lock can be taken (a filesystem without
    locks, a directory this process may not write) it goes on without, as before."""
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
    """``claim`` for the time of a run: one that stops (an error, Ctrl-C, a search's pruning)
    lets go, its checkpoint kept for a resume, so that a long sweep or search holds no lock of
    a run it has left; one that finishes keeps it until ``remove_finished``."""
    claim(directory)
    try:
        yield
    except BaseException:
        let_go(directory)
        raise


def remove_finished(directory: str | os.PathLike) -> None:
    """The run (or sweep) checkpointed in ``directory`` has ended for good: its checkpoint
    removed, then its ``claim`` let go (in that order: a resume in between finds nothing)."""
    shutil.rmtree(directory, ignore_errors=True)
    let_go(directory)


def let_go(directory: str | os.PathLike) -> None:
    """This process no longer trains the run in ``directory`` (it stopped): its ``claim`` let
    go, its checkpoint kept."""
    lock = _owned.pop(Path(directory).absolute(), None)
    if lock is not None:
        os.close(lock)


def _publish(directory: Path, partial: Path, name: str) -> None:
    """Make the written epoch the one to resume from: every file on disk first (power loss),
    the directory renamed in one step, and only then named by ``latest`` (itself replaced in
    one step); the previous epoch is removed last."""
    for file in partial.iterdir():
        _fsync(file)
    _fsync(partial)
    shutil.rmtree(directory / name, ignore_errors=True)
    os.replace(partial, directory / name)  # the epoch appears whole, in one step
    _fsync(directory)
    pointer = directory / "latest.partial"
    pointer.write_text(name)
    _fsync(pointer)
    os.replace(pointer, directory / LATEST)  # and only now becomes the one to resume from
    _fsync(directory)
    for old in directory.glob("epoch-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _link_best(previous: Path, partial: Path) -> bool:
    """The best epoch did not change: its weights are in the previous epoch's checkpoint (its
    best file, or its own weights when it was the best): a hard link, not a copy."""
    if not (previous / "state.pt").is_file():
        return False
    try:
        state = torch.load(previous / "state.pt", weights_only=True, mmap=True,
                           map_location="cpu")
    except Exception:  # noqa: BLE001 - unreadable: write the weights instead
        return False
    source = previous / ("model.safetensors" if state.get("best_is_current")
                         else "best.safetensors")
    try:
        os.link(source, partial / "best.safetensors")
    except OSError:  # no such file, or a filesystem without hard links
        return False
    return True


LATEST = "latest"


def trained_weights(model) -> dict[str, torch.Tensor]:
    """The weights training changes: every parameter in full fine-tuning, the adapters alone
    with LoRA (tied weights once)."""
    return {name: parameter.detach() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def frozen_sha256(model) -> str | None:
    """Fingerprint of the weights training leaves alone (LoRA's base), which a checkpoint does
    not hold: a resume that found other ones (the model's source changed) would silently train
    another model. None when every weight is trained."""
    import hashlib

    digest, frozen = hashlib.sha256(), False
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            frozen = True
            digest.update(name.encode("utf-8"))
            digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8)
                          .numpy().tobytes())
    return digest.hexdigest() if frozen else None


def load_trained_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Load what ``trained_weights`` saved."""
    missing = set(trained_weights(model)) - set(weights)
    unexpected = set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise MedLMError(f"the checkpoint's weights do not fit this model (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): expected "
                         "the model (and --lora-rank) the run was trained with")
    model.load_state_dict(weights, strict=False)


def write_durably(path: str | os.PathLike, text: str) -> None:
    """Replace a small file in one step, on disk before it is named (a kill or a power loss
    leaves the old content or the new, never part of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(text)
    _fsync(partial)
    os.replace(partial, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (directories: where the OS allows opening them)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a directory on Windows
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def current_epoch_directory(directory: str | os.PathLike) -> Path | None:
    """The complete epoch a run resumes from, or None when there is none."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        current = directory / pointer.read_text().strip()
        if (current / "state.pt").is_file():
            return current
    complete = sorted((path for path in directory.glob("epoch-*")
                       if (path / "state.pt").is_file() and path.name[6:].isdigit()),
                      key=lambda path: int(path.name[6:]))
    if complete:  # no pointer, or one naming a directory that is gone: the newest whole epoch
        return complete[-1]
    return None


def _required_epoch_directory(directory: str | os.PathLike) -> Path:
    current = current_epoch_directory(directory)
    if current is None:
        raise MedLMError(f"no checkpoint in {str(directory)!r}: expected a directory written "
                         "after a completed epoch")
    return current


def has_checkpoint(directory: str | os.PathLike) -> bool:
    return current_epoch_directory(directory) is not None


def load_checkpoint(directory: str | os.PathLike, model, frozen: str | None = None,
                    precision=None) -> dict:
    """Load the trained weights into ``model``, restore this process's RNGs and return the
    rest of the state (``TrainState.load_state_dict``'s), with ``best_weights`` (the main
    process's alone: it logs the model). ``frozen``: the model's ``frozen_sha256``, which must
    be the checkpoint's; ``precision``: this run's (``medlm.modeling.Precision``), said where it
    differs from the checkpoint's. A run continues with as many processes as it was trained
    with (the batches each process draws depend on it)."""
    directory = _required_epoch_directory(directory)
    state = _torch_load(directory / "state.pt")
    _check_world_size(directory, len(state["rng"]), distributed.world_size())
    if state["frozen_sha256"] != frozen:
        raise MedLMError(f"the checkpoint in {str(directory.parent)!r} was trained on other "
                         "frozen base weights than the model loaded now (its file or Hub "
                         "revision changed): expected the base the run started from")
    if precision is not None and state["precision"] != precision.name:
        log.warning("WARNING: resuming in %s on %s; the epochs before were trained in %s "
                    "(another machine): the losses from here on are not bit-for-bit those of "
                    "an uninterrupted run", precision.name, precision.device_type,
                    state["precision"])
    weights = directory / "model.safetensors"
    with _reading(weights):
        load_trained_weights(model, load_file(str(weights)))
    best = directory / "best.safetensors"
    state["best_weights"] = None  # kept by the main process alone: it logs the model
    if distributed.is_main() and state["best_is_current"]:
        state["best_weights"] = {name: tensor.to("cpu", copy=True)
                                 for name, tensor in trained_weights(model).items()}
    elif distributed.is_main() and best.is_file():
        with _reading(best):
            state["best_weights"] = load_file(str(best))
    restore_rng(state["rng"][distributed.rank()])
    return state


def check_world_size(directory: str | os.PathLike, world_size: int) -> None:
    """A run continues with as many processes as it was trained with."""
    state = _torch_load(_required_epoch_directory(directory) / "state.pt", mmap=True)
    _check_world_size(directory, len(state["rng"]), world_size)


def check_readable(directory: str | os.PathLike) -> None:
    """Every file of the epoch a run resumes from opens: one cut short (a full disk, a copy
    that stopped) or overwritten fails now, in one line naming it, not after the data and the
    model have loaded. Headers and archive directories are read, not the tensors."""
    current = _required_epoch_directory(directory)
    _torch_load(current / "state.pt", mmap=True)
    for name in ("model.safetensors", "best.safetensors"):
        path = current / name
        if path.is_file() or name == "model.safetensors":
            with _reading(path), safe_open(str(path), "pt") as file:
                file.keys()


# what torch and safetensors raise for a file cut short, overwritten or missing
DAMAGED = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError,
           FileNotFoundError)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A checkpoint file that cannot be read is one line naming it, and what to do."""
    try:
        yield
    except DAMAGED as error:
        epoch = path.parent
        whole = sorted((other for other in epoch.parent.glob("epoch-*")
                        if other != epoch and other.name[6:].isdigit()
                        and (other / "state.pt").is_file()), key=lambda other: int(other.name[6:]))
        earlier = (f", or resume from {whole[-1].name}, which is there too: write "
                   f"{whole[-1].name} into {epoch.parent / LATEST}" if whole else "")
        empty = path.is_file() and path.stat().st_size == 0
        reason = "an empty file" if empty else first_line(error)[:200]
        raise MedLMError(f"the checkpoint file {path} is damaged ({reason}): "
                         f"expected a whole file, as the run wrote it: start the run again"
                         f"{earlier}") from None


def _torch_load(path: Path, mmap: bool = False):
    """``torch.load`` of a checkpoint's state (tensors and plain values only). map_location:
    a checkpoint written on a GPU resumes on a CPU-only machine, and no torchrun rank
    deserialises onto cuda:0; the optimizer moves its state to the parameters' device."""
    with _reading(path):
        state = torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    if state.get("format") != FORMAT:
        raise MedLMError(f"the checkpoint {path.parent} was written by an older MedLM (format "
                         f"{state.get('format', 1)}, not {FORMAT}): expected one of this "
                         "version: finish the run with the MedLM that started it, or start it "
                         "again")
    return state


def _check_world_size(directory, saved_world_size: int, world_size: int) -> None:
    if saved_world_size != world_size:
        raise MedLMError(f"the checkpoint in {str(directory)!r} was written by "
                         f"{saved_world_size} training process(es), not {world_size}: expected "
                         f"to resume with {saved_world_size} (torchrun's processes in all; 1 = "
                         "no torchrun)")


def saved_epochs(directory: str | os.PathLike) -> list[dict]:
    """The epoch results recorded in a checkpoint, without loading any weights."""
    return _torch_load(_required_epoch_directory(directory) / "state.pt", mmap=True)["epochs"]


def _tuples(value):
    """``random.getstate()`` as ``torch.load`` gives it back (lists) made tuples again."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value
