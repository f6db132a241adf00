"""A local folder standing in for a hub repository: `HfApi.create_repo`, `list_repo_files` and `create_commit` are
replaced (for the test only) by functions that apply the commit's operations to `<tmp>/hub/<namespace>--<name>/`
(one folder per repository, whatever the branch; `create_branch` is recorded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi


@dataclass
class FakeHub:
    root: Path
    commits: list[tuple[str, list[Any]]] = field(default_factory=list)
    branches: list[tuple[str, str]] = field(default_factory=list)

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "--")

    def files(self, repo_id: str) -> set[str]:
        folder = self.repo(repo_id)
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub = FakeHub(tmp_path / "hub")

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        hub.repo(repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        return sorted(hub.files(repo_id))

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, create_pr=None, **kwargs):
        folder, operations = hub.repo(repo_id), list(operations)
        for op in operations:
            target = folder / op.path_in_repo
            if isinstance(op, CommitOperationAdd):
                target.parent.mkdir(parents=True, exist_ok=True)
                with op.as_file() as f:
                    target.write_bytes(f.read())
            elif isinstance(op, CommitOperationDelete):
                target.unlink()
        hub.commits.append((commit_message, operations))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", pr_url=None)

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        hub.branches.append((repo_id, branch))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return hub
