"""One look at the Hugging Face hub before a hub id is handed to ``from_pretrained``.

``from_pretrained("my_local_model")`` on a machine that cannot reach the hub retries every request with back-off
(about 50 s) before it fails, and a name the hub does not have fails only after the same requests. One
``model_info`` request (no retries) answers both questions first: the model exists (load it), the hub has no such
model (refuse now), or the hub cannot be reached (use the local hub cache if the model is there, else refuse now).
"""

from __future__ import annotations

from functools import lru_cache

HUB_TIMEOUT_S = 10.0
FOUND, MISSING, UNREACHABLE = "found", "missing", "unreachable"


@lru_cache(maxsize=64)
def probe_hub(repo_id: str) -> tuple[str, str]:
    """``(FOUND | MISSING | UNREACHABLE, reason)`` for ``repo_id`` from one request (once per process)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return FOUND, "gated (from_pretrained asks for access)"
    except RepositoryNotFoundError:
        return MISSING, "no such model (or a private one: log in with `hf auth login`)"
    except Exception as e:  # noqa: BLE001 - any failure to get an answer: DNS, refused, timeout, 5xx, proxy
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return UNREACHABLE, first
    return FOUND, ""


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local hub cache holds ``repo_id``'s ``config.json`` (an earlier download)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot even name is not cached
        return False


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: transformers reads the cache only, without retries; no probe is needed."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
