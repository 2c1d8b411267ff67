"""Where a model comes from (a locally built name, a folder, the hub), checked in seconds.

Nothing here imports torch or LeRobot, so ``zk0 simulate -c "model-name=..."`` with a
model that cannot be had fails before the seconds those imports cost.
"""

from __future__ import annotations

import os
from pathlib import Path

from zk0.tiny import VLMS


class ModelUnavailable(RuntimeError):
    """The requested pretrained model cannot be loaded (offline, missing, not a SmolVLA)."""


def require_model(name: str) -> None:
    """Fail within seconds, with one line, unless ``name`` is local (built, or a folder) or a reachable hub model."""
    if name in VLMS or Path(name).expanduser().is_dir():
        return
    if name.startswith(("/", ".", "~")):
        raise ModelUnavailable(f"model folder {name!r} does not exist: pass a folder saved by "
                               "SmolVLAPolicy.save_pretrained, a hub id, or model-name=\"tiny\"")
    _require_hub_model(name)


def _require_hub_model(repo_id: str) -> None:
    """Fail fast unless ``repo_id`` is in the local hub cache or the hub answers within seconds."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
        return
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelUnavailable(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                               "set: download it on a connected machine or use model-name=\"tiny\"")
    try:
        HfApi().model_info(repo_id, timeout=5)
    except Exception as err:  # HTTP, DNS, TLS, validation: any failure means we cannot load it
        if isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) == 404:
            raise ModelUnavailable(f"model {repo_id!r} does not exist on the Hugging Face hub") from None
        raise ModelUnavailable(f"model {repo_id!r} is unreachable on the Hugging Face hub "
                               f"({type(err).__name__}); check the network or use model-name=\"tiny\"") from None
