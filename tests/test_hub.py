"""Publishing through `huggingface_hub`, tested at its boundary with a fake `HfApi` that commits to a local folder."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import torch
from builders import bert_inputs, make_bert
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from transformers import AutoModelForSequenceClassification

from hf_svd_compress import SVDConfig, load_compressed, push_compressed_to_hub, save_compressed, svd_factorize_
from hf_svd_compress.hub import load as export_module
from hf_svd_compress.hub import push as hub_module
from hf_svd_compress.hub.push import DEFAULT_COMMIT_MESSAGE


class FakeHfApi(HfApi):
    """Records every call (checking its arguments against the real signature) and commits into `root/repo/rev`."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root, self.calls = root, []

    def _record(self, method: str, *args, **kwargs) -> None:
        inspect.signature(getattr(HfApi, method)).bind(self, *args, **kwargs)  # a real client would accept them
        self.calls.append((method, args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", repo_id, **kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", repo_id, **kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)
        branch = kwargs.get("revision") or "main"
        destination = self.root / kwargs["repo_id"] / (f"pr-{branch}" if kwargs.get("create_pr") else branch)
        shutil.copytree(kwargs["folder_path"], destination, dirs_exist_ok=True)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'0' * 40}",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid="0" * 40,
        )

    def kwargs_of(self, method: str) -> dict:
        return next(kwargs for name, _, kwargs in self.calls if name == method)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def api(tmp_path) -> FakeHfApi:
    return FakeHfApi(tmp_path / "hub")


@pytest.fixture
def model():
    model = svd_factorize_(make_bert(), SVDConfig())
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "mask"):
                layer.mask[4:] = False
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**bert_inputs()).logits


def test_push_model_then_load_the_commit_with_both_loaders(api, model, tmp_path):
    info = push_compressed_to_hub(
        model, "user/tiny-bert-svd", api=api, private=True, rank_selection={"method": "energy", "energy": 0.9}
    )
    assert isinstance(info, CommitInfo)
    assert [name for name, _, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == ("user/tiny-bert-svd",)
    assert api.kwargs_of("create_repo") == {"token": None, "private": True, "repo_type": "model", "exist_ok": True}
    upload = api.kwargs_of("upload_folder")
    assert (upload["repo_id"], upload["commit_message"], upload["revision"], upload["create_pr"], upload["token"]) == (
        "user/tiny-bert-svd",
        DEFAULT_COMMIT_MESSAGE,
        None,
        False,
        None,
    )
    committed = tmp_path / "hub" / "user" / "tiny-bert-svd" / "main"
    assert sorted(p.name for p in committed.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "modeling_svd_compressed.py",
    ]
    assert 'from_pretrained("user/tiny-bert-svd", trust_remote_code=True)' in (committed / "README.md").read_text()
    expected = logits(model)
    torch.testing.assert_close(logits(load_compressed(committed)), expected, atol=1e-5, rtol=1e-4)
    remote = AutoModelForSequenceClassification.from_pretrained(committed, trust_remote_code=True)
    torch.testing.assert_close(logits(remote), expected, atol=1e-5, rtol=1e-4)


def test_push_folder_to_a_branch_as_pull_request(api, model, tmp_path):
    folder = save_compressed(model, tmp_path / "local")
    push_compressed_to_hub(
        folder, "user/repo", api=api, token="hf_test", commit_message="v2", revision="dev", create_pr=True
    )
    assert [name for name, _, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.kwargs_of("create_branch") == {
        "branch": "dev",
        "token": "hf_test",
        "repo_type": "model",
        "exist_ok": True,
    }
    upload = api.kwargs_of("upload_folder")
    assert (upload["commit_message"], upload["revision"], upload["create_pr"], upload["token"]) == (
        "v2",
        "dev",
        True,
        "hf_test",
    )
    assert api.kwargs_of("create_repo")["token"] == "hf_test"
    committed = tmp_path / "hub" / "user" / "repo" / "pr-dev"
    torch.testing.assert_close(logits(load_compressed(committed)), logits(model), atol=1e-5, rtol=1e-4)


def test_save_compressed_with_push_to_hub(api, model, tmp_path):
    save_compressed(model, tmp_path / "local", push_to_hub=True, repo_id="org/name", api=api, commit_message="hi")
    assert (tmp_path / "local" / "config.json").is_file()
    assert api.kwargs_of("upload_folder")["folder_path"] == tmp_path / "local"
    assert api.kwargs_of("upload_folder")["commit_message"] == "hi"
    assert (tmp_path / "hub" / "org" / "name" / "main" / "model.safetensors").is_file()


def test_push_defaults_to_a_real_hf_api(monkeypatch, model, tmp_path):
    made = []

    def factory():
        made.append(FakeHfApi(tmp_path / "hub"))
        return made[-1]

    monkeypatch.setattr(hub_module, "HfApi", factory)
    push_compressed_to_hub(model, "user/default")
    assert len(made) == 1 and made[0].kwargs_of("create_repo")["token"] is None


def test_load_compressed_from_a_repo_id(api, model, tmp_path, monkeypatch):
    push_compressed_to_hub(model, "user/remote", api=api)
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(tmp_path / "hub" / repo_id / (kwargs["revision"] or "main"))

    monkeypatch.setattr(export_module, "snapshot_download", fake_snapshot_download)
    loaded = load_compressed("user/remote", token="hf_x")
    assert seen["repo_id"] == "user/remote" and seen["token"] == "hf_x" and "config.json" in seen["allow_patterns"]
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-4)


def test_push_refuses_bad_input_before_any_call(api, model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_compressed_to_hub(tmp_path / "empty", "user/x", api=api)
    with pytest.raises(TypeError, match="only when pushing a model"):
        push_compressed_to_hub(tmp_path / "empty", "user/x", api=api, rank_selection={})
    assert api.calls == []
