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
import urllib.error
import urllib.request

from medlm.errors import MedLMError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnavailable(MedLMError):
    """A Hub id was needed, the Hub does not answer and the id is not in the local cache."""

    def __init__(self, kind: str, name: str, reason: str):
        self.kind, self.name, self.reason = kind, name, reason
        super().__init__(f"{kind} {name!r} is not in the local Hugging Face cache and the Hub "
                         f"is not reachable ({reason})")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_by_setting() -> bool:
    return any(os.environ.get(name, "").upper() in _TRUE
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub endpoint answers (any HTTP status); otherwise why not, in a few words.
    The whole question, name resolution included, takes at most ``timeout`` seconds."""
    if offline_by_setting():
        return "HF_HUB_OFFLINE=1"
    url = endpoint()
    answer: list[str | None] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
            answer.append(None)
        except urllib.error.HTTPError:
            answer.append(None)  # it answered, if only with an error status
        except urllib.error.URLError as error:
            answer.append(f"{url}: {getattr(error.reason, 'strerror', None) or error.reason}")
        except (OSError, ValueError) as error:
            answer.append(f"{url}: {error or type(error).__name__}")

    thread = threading.Thread(target=ask, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
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
            log.info("the Hugging Face Hub is not reachable (%s): using its local cache only",
                     reason)
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
    """Whether a Hub model id has a config in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
