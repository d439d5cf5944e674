"""Is the Hugging Face Hub reachable? Asked once, in seconds (its client retries each file for
~25 s); if not, the Hub libraries keep to their local cache, so anything loads or fails at once."""

import os
import sys
import threading

from medlm.errors import MedLMError

PROBE_TIMEOUT_S = 3.0


class HubUnavailable(MedLMError):
    """A Hub id was needed, the Hub does not answer and the id did not load from the cache."""

    def __init__(self, kind: str, name: str, reason: str, detail: str = ""):
        self.kind = kind  # "model" or "dataset"
        detail = f" ({detail[:150]})" if detail else ""
        super().__init__(f"{kind} {name!r} is not in the local Hugging Face cache{detail} and "
                         f"the Hub is not reachable ({reason})")


def offline_setting() -> str | None:
    """``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``) when it puts huggingface_hub offline."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if value := os.environ.get(name):
            return f"{name}={value}" if value.upper() in {"1", "ON", "YES", "TRUE"} else None
    return None


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub answers (any HTTP status) to huggingface_hub's own client (its proxies,
    certificates) within ``timeout`` seconds, name resolution included; else why not."""
    if setting := offline_setting():
        return setting
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    silent = f"{url} did not answer within {timeout:g} s"
    answer: list[str | None] = []

    def ask() -> None:
        try:
            from huggingface_hub.utils import get_session
            get_session().head(url, timeout=timeout, follow_redirects=False)
            answer.append(None)
        except Exception as error:  # noqa: BLE001 - the HTTP stack's errors have many types
            cause = error.__cause__ or error.__context__ or error
            answer.append(silent if "Timeout" in type(error).__name__ else
                          f"{url}: {str(cause).strip() or type(error).__name__}"[:200])

    thread = threading.Thread(target=ask, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout + 0.5)
    return answer[0] if answer else silent


_decided: dict[str, str | None] = {}


def check_hub(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub is out of reach (asked once per process), the Hub libraries then set to their
    cache as by ``HF_HUB_OFFLINE=1``, also those already imported; None when it answers."""
    if "reason" not in _decided:
        _decided["reason"] = unreachable_reason(timeout)
        if _decided["reason"]:
            os.environ["HF_HUB_OFFLINE"] = "1"
            if constants := sys.modules.get("huggingface_hub.constants"):
                constants.HF_HUB_OFFLINE = True
            if config := sys.modules.get("datasets.config"):
                config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    return _decided["reason"]


def model_in_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # not a repo id at all
        return False
