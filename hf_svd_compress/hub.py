"""Publish a compressed model on the Hugging Face Hub through `huggingface_hub`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi
from torch import nn

DEFAULT_COMMIT_MESSAGE = "Upload SVD-compressed model (hf_svd_compress)"


def push_compressed_to_hub(
    folder_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
    **save_kwargs: Any,
) -> CommitInfo:
    """Upload a `save_compressed` folder, or save a model to a temporary folder and upload that.

    Args:
        folder_or_model (`str`, `os.PathLike` or `PreTrainedModel`): A folder written by `save_compressed`, or a model.
        repo_id (`str`): The Hub repository, e.g. `"user/bert-svd"`; created if missing (`exist_ok=True`).
        private (`bool`, *optional*): Visibility of a newly created repository (default: the account's default).
        token (`str` or `bool`, *optional*): Hub token; `None` lets huggingface_hub find it (`HF_TOKEN`, login).
        commit_message (`str`, *optional*): The commit message.
        revision (`str`, *optional*): Branch to commit to, created if missing.
        create_pr (`bool`, defaults to `False`): Open a pull request instead of committing to the branch.
        api (`HfApi`, *optional*): The client to use (tests pass a fake one).
        save_kwargs: Passed to `save_compressed` when a model is given (e.g. `rank_selection`, `processing_class`).

    Returns:
        The `CommitInfo` of the upload.
    """
    api = api if api is not None else HfApi()
    if isinstance(folder_or_model, nn.Module):
        from .export import save_compressed  # export imports this module

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / repo_id.rpartition("/")[2]
            save_compressed(folder_or_model, folder, repo_id=repo_id, **save_kwargs)
            return _upload(api, folder, repo_id, private, token, commit_message, revision, create_pr)
    if save_kwargs:
        raise TypeError(f"Arguments {sorted(save_kwargs)} apply only when pushing a model, not a folder.")
    folder = Path(folder_or_model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: write it with save_compressed first.")
    return _upload(api, folder, repo_id, private, token, commit_message, revision, create_pr)


def _upload(
    api: HfApi,
    folder: Path,
    repo_id: str,
    private: bool | None,
    token: str | bool | None,
    commit_message: str | None,
    revision: str | None,
    create_pr: bool,
) -> CommitInfo:
    repo_id = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True).repo_id
    if revision is not None:  # upload_folder fails on a branch that does not exist yet
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        token=token,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )
