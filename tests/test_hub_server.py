"""The fake Hub (tests/hub_server.py) driven by the real huggingface_hub and transformers clients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from tests.hub_server import FakeHub

REPO = "user/tiny"

# Runs in a fresh interpreter whose only way to the Hub is HF_ENDPOINT (read when huggingface_hub is imported).
LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained("user/tiny")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 2, 128), config
    model = AutoModelForCausalLM.from_pretrained("user/tiny")
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained (config, generation config, safetensors weights)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _api(hub: FakeHub, token: str | bool = True) -> HfApi:
    """A client for the fake hub, with its valid token by default."""
    return HfApi(endpoint=hub.endpoint, token=hub.token if token is True else token)


def _push(hub: FakeHub, folder: Path, repo_id: str = REPO, private: bool = False) -> str:
    """Create ``repo_id`` and upload ``folder`` in one commit, as a conversion script would; the commit oid."""
    api = _api(hub)
    api.create_repo(repo_id, private=private)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload tiny llama").oid


def _local_files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by repo-style relative path (the cache's snapshot holds symlinks)."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_push_then_from_pretrained_in_a_subprocess(fake_hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path):
    oid = _push(fake_hub, tiny_llama_dir)
    assert fake_hub.commits(REPO) == ["Upload tiny llama", "initial commit"]  # upload_folder: one commit
    assert _api(fake_hub).model_info(REPO).sha == oid

    out = tmp_path / "loaded.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(out)], env=fake_hub.env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]

    original, loaded = load_file(tiny_llama_dir / "model.safetensors"), load_file(out)
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name
    assert f"HEAD /{REPO}/resolve/{oid}/model.safetensors" in fake_hub.requests  # it came from the fake hub


def test_snapshot_download_gets_every_file(fake_hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path):
    api = _api(fake_hub)
    _push(fake_hub, tiny_llama_dir)
    api.create_commit(
        repo_id=REPO,
        operations=[CommitOperationAdd(path_in_repo="extra/notes.txt", path_or_fileobj=b"nested file")],
        commit_message="Add notes",
    )
    expected = {**_local_files(tiny_llama_dir), "extra/notes.txt": b"nested file"}
    assert fake_hub.files(REPO) == {**expected, ".gitattributes": fake_hub.files(REPO)[".gitattributes"]}

    snapshot = Path(snapshot_download(REPO, endpoint=fake_hub.endpoint, cache_dir=tmp_path / "cache", token=False))
    assert _local_files(snapshot) == fake_hub.files(REPO)
    assert sorted(api.list_repo_files(REPO)) == sorted(fake_hub.files(REPO))
    assert api.file_exists(REPO, "extra/notes.txt") and not api.file_exists(REPO, "extra/missing.txt")
    assert [entry.path for entry in api.list_repo_tree(REPO, path_in_repo="extra")] == ["extra/notes.txt"]

    # Unchanged files are skipped (preupload reports their oid), so a second upload makes no commit.
    api.upload_folder(repo_id=REPO, folder_path=tiny_llama_dir)
    assert fake_hub.commits(REPO) == ["Add notes", "Upload tiny llama", "initial commit"]


def test_old_revisions_and_branches_stay_readable(fake_hub: FakeHub, tmp_path: Path):
    api = _api(fake_hub)
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=REPO).oid
    api.create_branch(REPO, branch="dev")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=REPO, revision="dev")

    def read(revision: str) -> bytes:
        path = hf_hub_download(REPO, "f.txt", revision=revision, endpoint=fake_hub.endpoint, cache_dir=tmp_path)
        return Path(path).read_bytes()

    assert (read(first), read("main"), read("dev")) == (b"v1", b"v2", b"dev")
    with pytest.raises(RevisionNotFoundError):
        read("no-such-branch")


def test_wrong_or_missing_token_gives_a_clear_401(fake_hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path):
    with pytest.raises(HfHubHTTPError) as wrong:
        _api(fake_hub, token="hf_not_a_valid_token").create_repo(REPO)
    assert wrong.value.response.status_code == 401
    assert not isinstance(wrong.value, RepositoryNotFoundError)  # a token problem, not a missing repo
    assert "Invalid credentials in Authorization header" in str(wrong.value)

    _push(fake_hub, tiny_llama_dir)
    with pytest.raises(HfHubHTTPError) as anonymous:
        _api(fake_hub, token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as wrong_read:  # the Hub rejects a bad token even on public reads
        hf_hub_download(REPO, "config.json", endpoint=fake_hub.endpoint, token="hf_wrong", cache_dir=tmp_path)
    assert wrong_read.value.response.status_code == 401
    assert fake_hub.commits(REPO) == ["Upload tiny llama", "initial commit"]


def test_refused_repo_gives_403(fake_hub: FakeHub):
    fake_hub.create_repo(REPO)
    fake_hub.refused_repos.update({REPO, "user/locked"})
    api = _api(fake_hub)
    with pytest.raises(HfHubHTTPError) as push:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert push.value.response.status_code == 403
    assert "403 Forbidden" in str(push.value)
    with pytest.raises(HfHubHTTPError) as create:
        api.create_repo("user/locked")
    assert create.value.response.status_code == 403
    assert fake_hub.commits(REPO) == ["initial commit"]


def test_unknown_repo_and_missing_file(fake_hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path):
    api = _api(fake_hub)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "config.json", endpoint=fake_hub.endpoint, cache_dir=tmp_path)
    assert not api.repo_exists("user/nope")

    _push(fake_hub, tiny_llama_dir)
    # transformers probes optional files and needs exactly this error (404 EntryNotFound) for them.
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", endpoint=fake_hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_repo(REPO)
    assert exists.value.response.status_code == 409
    api.create_repo(REPO, exist_ok=True)


def test_private_repo_needs_a_token(fake_hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path):
    _push(fake_hub, tiny_llama_dir, private=True)
    anonymous = _api(fake_hub, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", endpoint=fake_hub.endpoint, token=False, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, endpoint=fake_hub.endpoint, token=False, cache_dir=tmp_path)

    assert _api(fake_hub).model_info(REPO).private
    path = hf_hub_download(REPO, "config.json", endpoint=fake_hub.endpoint, token=fake_hub.token, cache_dir=tmp_path)
    assert Path(path).read_bytes() == (tiny_llama_dir / "config.json").read_bytes()


def test_patch_points_this_process_at_the_hub(fake_hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path):
    endpoint_before, token_before = constants.ENDPOINT, os.environ.get("HF_TOKEN")
    cache = tmp_path / "cache"
    with fake_hub.patch(token=True, cache_dir=cache):
        # No endpoint or token passed anywhere: module-level helpers and transformers find the fake hub.
        HfApi().create_repo(REPO, private=True)
        huggingface_hub.upload_folder(repo_id=REPO, folder_path=tiny_llama_dir)
        assert huggingface_hub.file_exists(REPO, "model.safetensors")
        assert AutoConfig.from_pretrained(REPO).hidden_size == 32
        assert Path(hf_hub_download(REPO, "config.json")).is_relative_to(cache)
    assert (constants.ENDPOINT, os.environ.get("HF_TOKEN")) == (endpoint_before, token_before)
    assert "Upload folder using huggingface_hub" in fake_hub.commits(REPO)


def test_env_for_subprocesses(fake_hub: FakeHub):
    base = {"PATH": "/bin", "HF_TOKEN": "leaked", "HF_HUB_CACHE": "/elsewhere", "HF_HUB_OFFLINE": "1"}
    env = fake_hub.env(base=base)
    assert env["HF_ENDPOINT"] == fake_hub.endpoint and env["PATH"] == "/bin"
    assert "HF_TOKEN" not in env and "HF_HUB_CACHE" not in env and env["HF_HUB_OFFLINE"] == "0"
    assert Path(env["HF_HOME"]).is_dir() and Path(env["HF_HOME"]).is_relative_to(fake_hub.root)
    assert env["HF_HUB_DISABLE_TELEMETRY"] == "1" and "127.0.0.1" in env["NO_PROXY"]
    assert fake_hub.env(token=True, base=base)["HF_TOKEN"] == fake_hub.token
    assert fake_hub.env(token="hf_other", base=base)["HF_TOKEN"] == "hf_other"
