"""``medcap export --push-to-hub REPO [--private]``: an export uploaded with huggingface_hub's
``HfApi.create_repo`` and ``HfApi.upload_folder``.

What is checked before the model loads (an export of a large model takes minutes): the repository
id, that the hub is not switched off (``HF_HUB_OFFLINE``), that there is a token (``HF_TOKEN`` or
``hf auth login``) and that the hub (``HF_ENDPOINT``, default huggingface.co) answers at all.

An adapter whose base ships in the export's ``base/`` folder (a built-in or random-initialised
model, or base weights changed by training) is pushed as two repositories: the base as
``REPO-base`` and the adapter as ``REPO``, whose ``adapter_config.json`` then names ``REPO-base``,
so ``AutoPeftModel.from_pretrained("REPO")`` works anywhere. The pushed copy's model card names the
repositories; the local export keeps its own card and its absolute ``base/`` path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class PushError(ValueError):
    """The push cannot happen; the message says why and what to do."""


def base_repo_of(repo_id: str) -> str:
    """Where the base of an adapter export with its own ``base/`` is pushed."""
    return f"{repo_id}-base"


def check_push_target(repo_id: str, seconds: float = 2.0) -> None:
    """Raise ``PushError`` unless ``repo_id`` can be pushed to: a valid ``owner/name``, the hub not
    switched off, a token at hand, the endpoint answering. Cheap: meant to run before the model loads."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from medcap.model.hub import _reachable

    try:
        validate_repo_id(repo_id)
        validate_repo_id(base_repo_of(repo_id))
    except HFValidationError as e:
        raise PushError(
            f"--push-to-hub {repo_id!r} is not a repository id like 'your-name/medcap-rocov2': {e}"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise PushError(
            "--push-to-hub needs the hub, but HF_HUB_OFFLINE is set: unset it, or export without pushing"
        )
    if not get_token():
        raise PushError(
            "--push-to-hub needs a Hugging Face token with write access: run `hf auth login`, or set HF_TOKEN"
        )
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    if not _reachable(url.hostname or "", port, seconds):
        raise PushError(
            f"--push-to-hub: the hub ({constants.ENDPOINT}) cannot be reached from this machine; export without "
            "--push-to-hub and upload the folder later with `hf upload REPO FOLDER` from a machine with network"
        )


def _linked_copy(src: Path, dst: Path) -> None:
    """``dst`` as a tree of hard links to ``src``'s files (a copy where links are not possible)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def push_export(folder: Path, repo_id: str, *, private: bool, hub_card: str) -> dict[str, Any]:
    """Upload the export ``folder`` to ``repo_id`` (and its ``base/`` to ``REPO-base``) with
    ``HfApi.upload_folder``; ``hub_card`` is the README.md of the pushed copy. Returns the URLs."""
    from huggingface_hub import HfApi

    api = HfApi()
    pushed: dict[str, Any] = {"repo": repo_id, "private": private}
    has_base = (folder / "base" / "config.json").is_file() and (folder / "adapter_config.json").is_file()
    if has_base:
        base_repo = base_repo_of(repo_id)
        api.create_repo(base_repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=base_repo,
            folder_path=folder / "base",
            commit_message=f"medcap export: the base model of {repo_id}",
        )
        pushed["base_repo"] = base_repo
        pushed["base_commit"] = info.commit_url
    # The pushed copy differs in two files (its card, its adapter's base); the weights are hard links.
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.hub.", dir=folder.parent) as tmp:
        view = Path(tmp)
        _linked_copy(folder, view)
        if has_base:
            shutil.rmtree(view / "base")
            config_path = view / "adapter_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = pushed["base_repo"]
            config_path.unlink()  # a hard link: writing through it would change the local export
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (view / "README.md").unlink()
        (view / "README.md").write_text(hub_card, encoding="utf-8")
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=view, commit_message="medcap export")
    pushed["url"] = str(url)
    pushed["commit"] = info.commit_url
    return pushed


__all__ = ["PushError", "base_repo_of", "check_push_target", "push_export"]
