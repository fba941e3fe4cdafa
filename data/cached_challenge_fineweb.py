#!/usr/bin/env python3
"""Download the challenge's published, pre-tokenized FineWeb export from the Hugging Face Hub.

Remote layout (a dataset repo; ROOT defaults to "datasets"):
  ROOT/manifest.json                                   lists datasets, shard counts and tokenizers
  ROOT/datasets/fineweb10B_sp<V>/fineweb_{val,train}_NNNNNN.bin
  ROOT/tokenizers/fineweb_<V>_bpe.{model,vocab}
Local layout: data/datasets/fineweb10B_sp<V>/, data/tokenizers/, data/datasets/manifest.json.

Every validation shard is fetched, plus the first --train-shards training shards. Files already
complete are skipped. Each file is downloaded under data/datasets/.staging/ (huggingface_hub resumes
an interrupted transfer from there), checked (shard header vs. size; size and sha256 when the
manifest lists them) and only then renamed to its final name.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

from tqdm import tqdm

REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
DATA_DIR = Path(__file__).resolve().parent
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024


class DownloadError(Exception):
    """A download problem reported to the user without a traceback."""


class OfflineError(DownloadError):
    pass


class HubFetcher:
    """The only part that touches the network. fetch() leaves the complete file at
    staging/<remote_path> and returns that path; partial transfers stay in staging to be resumed."""

    def __init__(self, repo_id: str = REPO_ID, revision: str | None = None):
        self.repo_id, self.revision = repo_id, revision

    def fetch(self, remote_path: str, staging: Path) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            OfflineModeIsEnabled, RepositoryNotFoundError)
        try:
            return Path(hf_hub_download(self.repo_id, remote_path, repo_type="dataset",
                                        revision=self.revision, local_dir=staging))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # Local... subclasses EntryNotFound
            raise OfflineError(f"cannot reach the Hugging Face Hub for {self.repo_id}/{remote_path}: "
                               "you seem to be offline (check the network, HF_ENDPOINT or HF_HUB_OFFLINE); "
                               "files already downloaded are kept and a re-run resumes") from e
        except (RepositoryNotFoundError, EntryNotFoundError) as e:
            raise DownloadError(f"{remote_path} not found in dataset repo {self.repo_id} "
                                "(check --repo-id / --remote-root)") from e
        except HfHubHTTPError as e:
            raise DownloadError(f"downloading {remote_path} from {self.repo_id} failed: {e}") from e


def shard_size_ok(path: Path) -> bool:
    """A .bin shard is complete iff its size matches the token count in its header."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        return False
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<3i", f.read(12))
    return magic == MAGIC and version == VERSION and size == HEADER_BYTES + 2 * n


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, expected: dict, *, hash_it: bool) -> str | None:
    """Return why `path` is not a complete, correct copy, or None if it is."""
    size = path.stat().st_size
    want = expected.get("bytes", expected.get("size"))
    if want is not None and size != int(want):
        return f"size mismatch: expected {int(want):,} bytes, got {size:,}"
    if path.suffix == ".bin" and not shard_size_ok(path):
        return f"truncated or corrupt shard ({size:,} bytes do not match its header)"
    if hash_it and expected.get("sha256") and sha256(path) != expected["sha256"]:
        return "sha256 mismatch"
    return None


def fetch_verified(fetcher, remote_root: str, rel: str, dest: Path, staging: Path, expected: dict) -> None:
    staged = Path(fetcher.fetch(f"{remote_root}/{rel}" if remote_root else rel, staging))
    problem = check_file(staged, expected, hash_it=True)
    if problem:
        staged.unlink()  # so the next attempt downloads it afresh instead of resuming bad bytes
        raise DownloadError(f"{rel}: {problem}; the file was discarded, re-run to download it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, dest)


def plan(manifest: dict, variant: str, train_shards: int) -> list[str]:
    """Remote paths (relative to the root) needed for `variant` with `train_shards` training shards."""
    name = f"fineweb10B_{variant}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        names = ", ".join(d.get("name", "?") for d in manifest.get("datasets", []))
        raise DownloadError(f"dataset {name} is not in the manifest (available: {names})")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise DownloadError(f"{name} has only {n_train} training shards, {train_shards} requested")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')!r} of {name} is not in the manifest")
    files = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    files += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [tok[k] for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    return files


def local_path(data_dir: Path, rel: str) -> Path:
    return data_dir / rel  # "datasets/..." and "tokenizers/..." map straight onto data/


def download(variant: str, train_shards: int, *, fetcher=None, data_dir: Path = DATA_DIR,
             remote_root: str = REMOTE_ROOT, progress: bool = True) -> list[Path]:
    """Bring the files of `variant` into data_dir; return their local paths."""
    if train_shards < 0:
        raise DownloadError("--train-shards must be >= 0")
    fetcher = fetcher or HubFetcher()
    data_dir = Path(data_dir)
    staging = data_dir / "datasets" / ".staging"
    manifest_path = data_dir / "datasets" / "manifest.json"
    try:
        fetch_verified(fetcher, remote_root, "manifest.json", manifest_path, staging, {})
    except OfflineError:
        if not manifest_path.is_file():
            raise
        print("warning: offline, using the manifest downloaded earlier", file=sys.stderr)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DownloadError(f"{manifest_path}: unreadable manifest ({e})") from None
    known = manifest.get("files") or {}  # optional {relative path: {"bytes": N, "sha256": hex}}
    files = plan(manifest, variant, train_shards)
    # Files already in place were verified before being renamed there; re-check only their size.
    todo = [rel for rel in files
            if not (local_path(data_dir, rel).is_file()
                    and check_file(local_path(data_dir, rel), known.get(rel, {}), hash_it=False) is None)]
    print(f"{len(files) - len(todo)} of {len(files)} files already complete", file=sys.stderr)
    for rel in tqdm(todo, unit="file", desc="downloading", file=sys.stderr, disable=not progress):
        fetch_verified(fetcher, remote_root, rel, local_path(data_dir, rel), staging, known.get(rel, {}))
    shutil.rmtree(staging, ignore_errors=True)  # everything is in place; drop resume state
    return [local_path(data_dir, rel) for rel in files]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="sp1024", help="e.g. sp1024: dataset fineweb10B_<variant>")
    ap.add_argument("--train-shards", type=int, default=80, help="leading training shards of 100M tokens (default 80)")
    ap.add_argument("--repo-id", default=REPO_ID, help="dataset repo (env MATCHED_FINEWEB_REPO_ID)")
    ap.add_argument("--remote-root", default=REMOTE_ROOT,
                    help="export folder in the repo (env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)")
    ap.add_argument("--revision", help="branch, tag or commit of the repo")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR,
                    help="where datasets/ and tokenizers/ go (default: this folder)")
    args = ap.parse_args(argv)
    try:
        paths = download(args.variant, args.train_shards, fetcher=HubFetcher(args.repo_id, args.revision),
                         data_dir=args.data_dir, remote_root=args.remote_root.strip("/"))
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, OfflineError) else 1
    print(f"done: {len(paths)} files under {args.data_dir / 'datasets'} and {args.data_dir / 'tokenizers'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
