"""Publish a compressed model on the Hugging Face Hub through `huggingface_hub`."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi

DEFAULT_COMMIT_MESSAGE = "Upload SVD-compressed model (hf_svd_compress)"


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None,
    token: str | bool | None,
    commit_message: str | None,
    revision: str | None,
    create_pr: bool,
    api: HfApi | None,
) -> CommitInfo:
    """Upload a folder written by `save_compressed` (the arguments are `push_compressed_to_hub`'s)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: write it with save_compressed first.")
    api = api if api is not None else HfApi()
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
