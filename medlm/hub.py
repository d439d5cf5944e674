"""Is the Hugging Face Hub reachable? Asked once, in seconds, before anything loads from it.

Without an answer the Hub client retries every request for about 25 s, per file, before it
fails. MedLM asks the endpoint once with a short deadline; when it does not answer (no network,
a host that does not reply, ``HF_HUB_OFFLINE=1``), the Hub libraries are switched to their
local cache only, so what is cached still loads at once and what is not fails at once. Online,
nothing changes: the libraries keep their retries.
"""

from __future__ import annotations

import logging
import os
import threading

from medlm.errors import MedLMError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnavailable(MedLMError):
    """A Hub id was needed, the Hub does not answer and the id did not load from the cache."""

    def __init__(self, kind: str, name: str, reason: str, detail: str = ""):
        self.kind, self.name, self.reason = kind, name, reason
        detail = f" ({detail[:150]})" if detail else ""
        super().__init__(f"{kind} {name!r} is not in the local Hugging Face cache{detail} and "
                         f"the Hub is not reachable ({reason})")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_setting() -> str | None:
    """The variable that puts the Hub libraries offline, as huggingface_hub reads it
    (``HF_HUB_OFFLINE`` first, else ``TRANSFORMERS_OFFLINE``), when it does; else None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            return f"{name}={value}" if value.upper() in _TRUE else None
    return None


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub endpoint answers (any HTTP status); otherwise why not, in a few words.
    Asked with huggingface_hub's own HTTP client (its proxies, certificates and client factory),
    so the answer is the one the Hub libraries would get. The whole question, name resolution
    included, takes at most ``timeout`` seconds."""
    setting = offline_setting()
    if setting:
        return setting
    url = endpoint()
    answer: list[str | None] = []

    def ask() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(url, timeout=timeout, follow_redirects=False)
            answer.append(None)  # it answered, whatever the status
        except Exception as error:  # noqa: BLE001 - the HTTP stack's errors have many types
            if "Timeout" in type(error).__name__:
                answer.append(f"{url} did not answer within {timeout:g} s")
                return
            cause = error.__cause__ or error.__context__ or error
            answer.append(f"{url}: {str(cause).strip() or type(error).__name__}"[:200])

    thread = threading.Thread(target=ask, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout + 0.5)
    if not answer:
        return f"{url} did not answer within {timeout:g} s"
    return answer[0]


_decided: dict[str, str | None] = {}


def check_hub(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Ask once per process; when the Hub is out of reach, switch the Hub libraries to their
    local cache (as ``HF_HUB_OFFLINE=1`` would) and return why. None when it answers."""
    if "reason" not in _decided:
        reason = unreachable_reason(timeout)
        _decided["reason"] = reason
        if reason:
            use_cache_only()
    return _decided["reason"]


def use_cache_only() -> None:
    """HF_HUB_OFFLINE=1 for this process, also for Hub libraries already imported (they read
    the variable once, on import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def model_in_cache(model_id: str) -> bool:
    """Whether a Hub model id has a config in the local Hugging Face cache (False for a name
    that is no valid Hub id at all)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # HFValidationError: not a repo id
        return False
