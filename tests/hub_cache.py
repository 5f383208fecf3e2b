"""Build a populated local Hugging Face Hub cache, so Hub-id loading is tested without any network access."""

import hashlib
import shutil
from pathlib import Path


def populate_hub_cache(folder: Path, repo_id: str, cache_dir: Path) -> str:
    """Lay `folder` out in `cache_dir` exactly as `huggingface_hub` stores a downloaded model repo.

    Returns the fake commit hash that `refs/main` points to.
    """
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit
