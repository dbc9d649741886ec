"""The Hugging Face Hub, as cogtune meets it: telling a hub id from a mistyped path, reading config
files from the local Hugging Face cache before asking the network, and failing within seconds,
with a message that says so, when the hub cannot be reached (an offline cluster node or login node).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from cogtune.errors import CogtuneError, first_line

REACH_TIMEOUT_S = 5.0  # the whole check, name lookup included
LOGIN_COMMAND = "hf auth login"


def looks_like_hub_id(name: str) -> bool:
    """`namespace/name` or `name`, as hub repositories are named; not a path such as ./x, /x, ~/x or a/b/c."""
    parts = name.split("/")
    return (len(parts) <= 2 and all(parts) and not name.startswith((".", "~", "/"))
            and all(part.replace("-", "").replace("_", "").replace(".", "").isalnum() for part in parts))


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, true, yes, on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    """The hub huggingface_hub talks to (HF_ENDPOINT, read when it was imported)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


@functools.lru_cache(maxsize=None)
def unreachable_reason(url: str | None = None) -> str | None:
    """Why the hub cannot be reached (None when it can), learnt from one HEAD request that may take
    at most REACH_TIMEOUT_S, however slow the name lookup; proxies from the environment are used.
    Any HTTP answer, even an error status, means the hub is there."""
    url = url or endpoint()
    outcome: dict[str, str | None] = {}

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=REACH_TIMEOUT_S)
            outcome["reason"] = None
        except urllib.error.HTTPError:
            outcome["reason"] = None
        except (urllib.error.URLError, OSError, ValueError) as e:
            outcome["reason"] = str(getattr(e, "reason", e)) or type(e).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(REACH_TIMEOUT_S)
    if "reason" not in outcome:
        return f"no answer within {REACH_TIMEOUT_S:g} s"
    return outcome["reason"]


def unreachable_message(what: str, reason: str) -> str:
    return (f"The Hugging Face Hub ({endpoint()}) could not be reached ({reason}), so {what} cannot be read, "
            "and it is not in the Hugging Face cache. Point --pretrained_model_name_or_path at a local copy of "
            "the pipeline (for example made with `hf download <id> --local-dir DIR` where there is network), "
            "or run where the hub can be reached (a local folder of that name does not exist here).")


def read_json(repo_id: str, filename: str, revision: str | None, cache_dir: str | None, flag: str) -> dict:
    """A JSON file of a hub repository: from the local Hugging Face cache when it is there (no
    network), else downloaded; a hub that cannot be reached fails at once with a message that says so."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    kwargs = dict(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir)
    try:
        path = hf_hub_download(**kwargs, local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises several types for that)
        if offline():
            raise CogtuneError(
                f"{flag} {repo_id}: {filename} is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so "
                "nothing is downloaded. Unset HF_HUB_OFFLINE where there is network, or point the flag at a local "
                "copy of the pipeline.") from None
        reason = unreachable_reason()
        if reason is not None:
            raise CogtuneError(f"{flag} {repo_id}: " + unreachable_message(filename, reason)) from None
        try:
            path = hf_hub_download(**kwargs)
        except GatedRepoError:
            raise CogtuneError(f"{flag} {repo_id} is a gated repository: accept its terms on the hub and log in "
                               f"(`{LOGIN_COMMAND}` or HF_TOKEN).") from None
        except RepositoryNotFoundError:
            raise CogtuneError(f"{flag} {repo_id}: there is no such repository on the hub (or it is private: "
                               f"log in with `{LOGIN_COMMAND}` or HF_TOKEN). A local folder must exist; check "
                               "the spelling.") from None
        except RevisionNotFoundError:
            raise CogtuneError(f"{flag} {repo_id} has no revision {revision!r} on the hub.") from None
        except EntryNotFoundError:
            raise CogtuneError(f"{flag} {repo_id} is not a diffusers pipeline: it has no {filename}.") \
                from None
        except OSError as e:  # a connection that broke off after the check
            raise CogtuneError(f"{flag} {repo_id}: " + unreachable_message(filename, first_line(e))) \
                from None
    return json.loads(Path(path).read_text())
