"""Hub downloads are checked against the sizes and sha256 the Hub lists (huggingface_hub mocked: no network)."""

from __future__ import annotations

import hashlib
import shutil
from types import SimpleNamespace

import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from kanana_quant import hub
from kanana_quant.errors import KananaQuantError


@pytest.fixture
def fake_hub(tiny_dense, tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_dense, snapshot)
    weights = snapshot / "model.safetensors"
    data = weights.read_bytes()
    listed = [RepoSibling("config.json"),
              RepoSibling("model.safetensors", lfs=BlobLfsInfo(len(data), hashlib.sha256(data).hexdigest(), 130))]
    calls = []

    def model_info(self, repo, files_metadata=False):
        calls.append(repo)
        return SimpleNamespace(siblings=listed)

    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, allow_patterns: str(snapshot))
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    return SimpleNamespace(snapshot=snapshot, weights=weights, calls=calls)


def test_download_matching_the_hub_is_accepted_and_hashed_once(fake_hub, monkeypatch):
    assert hub.resolve_model("kakao/tiny") == fake_hub.snapshot
    monkeypatch.setattr(hub, "_sha256", lambda path: pytest.fail("hashed again"))
    assert hub.resolve_model("kakao/tiny") == fake_hub.snapshot


def test_corrupted_download_fails_with_one_line(fake_hub):
    data = bytearray(fake_hub.weights.read_bytes())
    data[-1] ^= 0xFF
    fake_hub.weights.write_bytes(bytes(data))
    with pytest.raises(KananaQuantError, match="does not match the Hub's size/sha256"):
        hub.resolve_model("kakao/tiny")


def test_offline_metadata_uses_the_cached_copy(fake_hub, monkeypatch):
    def offline(self, repo, files_metadata=False):
        raise OSError("offline")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", offline)
    assert hub.resolve_model("kakao/tiny") == fake_hub.snapshot
