#!/usr/bin/env python3
"""Download the challenge's published, pre-tokenized FineWeb export from the Hugging Face Hub.

Where each export lives (a dataset repo; the flag --repo-id, else MATCHED_FINEWEB_REPO_ID, overrides it):
  sp1024 (and any variant not listed below)  willdepueoai/parameter-golf  (the challenge's own export)
  sp4096, sp8192                             kevclark/parameter-golf      (used by the SP4096/SP8192
                                             records from PR #1394 on; not in the challenge's repo)
  sp8192_caseops                             romeerp/parameter-golf-caseops-v1 (the CaseOps records, #1729
                                             on: dataset fineweb10B_sp8192_lossless_caps_caseops_v1_reserved)
Remote layout, the same in every repo (ROOT defaults to "datasets"):
  ROOT/manifest.json                                   lists datasets, shard counts and tokenizers
  ROOT/datasets/fineweb10B_sp<V>/fineweb_{val,train}_NNNNNN.bin
  ROOT/datasets/fineweb10B_sp<V>/fineweb_val_bytes_NNNNNN.bin   byte sidecar, if the manifest has val_bytes_glob
  ROOT/tokenizers/fineweb_<V>_bpe.{model,vocab}
Local layout: data/datasets/fineweb10B_sp<V>/, data/tokenizers/, and the manifest of each source at
data/datasets/manifests/<owner>/<repo>/<ROOT>/manifest.json (kept for offline re-runs).

Every validation shard is fetched, plus the first --train-shards training shards. Files already
complete are skipped. Each file is downloaded under data/datasets/.staging/ (huggingface_hub resumes
an interrupted transfer from there), checked (shard header vs. size; size and sha256 when the
manifest lists them) and only then renamed to its final name.

At the end, data/datasets/fineweb10B_sp<V>/manifest.json (not the source's manifest above) is rewritten
over every shard in that folder, with the sha256 of the variant's tokenizer, for train_gpt.py to check.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from build_shards import BuildError, sha256, shard_length, write_manifest  # data/ is on sys.path when run as a script

OFFICIAL_REPO_ID = "willdepueoai/parameter-golf"
# Exports that are not in the challenge's repo. kevclark/parameter-golf is the repo the SP4096 records
# (2026-04-01, 2026-04-04) and every SP8192 record from 2026-04-05 (PR #1394) on download from.
VARIANT_REPO_IDS = {"sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf",
                    "sp8192_caseops": "romeerp/parameter-golf-caseops-v1"}
# Our short names for exports published under a longer one (local folders keep the published names).
VARIANT_NAMES = {"sp8192_caseops": "sp8192_lossless_caps_caseops_v1_reserved"}
REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
DATA_DIR = Path(__file__).resolve().parent


def repo_id_for(variant: str, override: str | None = None, env=None) -> str:
    """The dataset repo to use: --repo-id, else MATCHED_FINEWEB_REPO_ID, else the variant's home."""
    env = os.environ if env is None else env
    return override or env.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPO_IDS.get(variant, OFFICIAL_REPO_ID)


class DownloadError(Exception):
    """A download problem reported to the user without a traceback."""


class OfflineError(DownloadError):
    pass


class HubFetcher:
    """The only part that touches the network. fetch() leaves the complete file at
    staging/<remote_path> and returns that path; partial transfers stay in staging to be resumed."""

    def __init__(self, repo_id: str = OFFICIAL_REPO_ID, revision: str | None = None):
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
                                "(check --repo-id / MATCHED_FINEWEB_REPO_ID and --remote-root)") from e
        except HfHubHTTPError as e:
            raise DownloadError(f"downloading {remote_path} from {self.repo_id} failed: {e}") from e


def shard_size_ok(path: Path) -> bool:
    """A .bin shard is complete iff its size matches the token count in its header."""
    try:
        shard_length(path)
        return True
    except BuildError:
        return False


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


def dataset_dir(variant: str) -> str:
    return f"datasets/fineweb10B_{VARIANT_NAMES.get(variant, variant)}"


def find_entries(manifest: dict, variant: str) -> tuple[dict, dict]:
    """The source manifest's entries for `variant`'s dataset and for its tokenizer."""
    name = f"fineweb10B_{VARIANT_NAMES.get(variant, variant)}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        names = ", ".join(d.get("name", "?") for d in manifest.get("datasets", []))
        raise DownloadError(f"dataset {name} is not in the manifest (available: {names})")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')!r} of {name} is not in the manifest")
    return entry, tok


def plan(manifest: dict, variant: str, train_shards: int) -> list[str]:
    """Remote paths (relative to the root) needed for `variant` with `train_shards` training shards."""
    entry, tok = find_entries(manifest, variant)
    name, stats = entry["name"], entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise DownloadError(f"{name} has only {n_train} training shards, {train_shards} requested")
    files = [f"{dataset_dir(variant)}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    if entry.get("val_bytes_glob"):  # the byte sidecar, one per validation shard (CaseOps)
        files += [f"{dataset_dir(variant)}/fineweb_val_bytes_{i:06d}.bin" for i in range(n_val)]
    files += [f"{dataset_dir(variant)}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [tok[k] for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    for rel in files:  # they become paths under data/: never absolute, never climbing out of it
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel:
            raise DownloadError(f"the manifest names an unsafe path {rel!r} for {name}")
    return files


def local_path(data_dir: Path, rel: str) -> Path:
    return data_dir / rel  # "datasets/..." and "tokenizers/..." map straight onto data/


def manifest_cache_path(data_dir: Path, repo_id: str | None, remote_root: str) -> Path:
    """Where the manifest of one source is kept: one file per repo and root, so that a manifest from
    one repo (say sp8192's) is never used for another (sp1024's) when re-running offline."""
    parts = [p for p in f"{repo_id or '_'}/{remote_root or '_'}".split("/") if p not in ("", ".", "..")]
    return Path(data_dir) / "datasets" / "manifests" / Path(*parts) / "manifest.json"


def download(variant: str, train_shards: int, *, fetcher=None, data_dir: Path = DATA_DIR,
             remote_root: str = REMOTE_ROOT, progress: bool = True) -> list[Path]:
    """Bring the files of `variant` into data_dir; return their local paths. The default fetcher reads
    the variant's default repo (repo_id_for)."""
    if train_shards < 0:
        raise DownloadError("--train-shards must be >= 0")
    fetcher = fetcher or HubFetcher(repo_id_for(variant))
    data_dir = Path(data_dir)
    staging = data_dir / "datasets" / ".staging"
    repo_id = getattr(fetcher, "repo_id", None)
    manifest_path = manifest_cache_path(data_dir, repo_id, remote_root)
    print(f"source: {repo_id or 'the given fetcher'}, export root {remote_root or '(repo root)'!r}", file=sys.stderr)
    try:
        fetch_verified(fetcher, remote_root, "manifest.json", manifest_path, staging, {})
    except OfflineError:
        if not manifest_path.is_file():
            raise
        print(f"warning: offline, using the manifest downloaded earlier ({manifest_path})", file=sys.stderr)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DownloadError(f"{manifest_path}: unreadable manifest ({e})") from None
    known = manifest.get("files") or {}  # optional {relative path: {"bytes": N, "sha256": hex}}
    try:
        files = plan(manifest, variant, train_shards)
    except DownloadError as e:
        home = VARIANT_REPO_IDS.get(variant, OFFICIAL_REPO_ID)
        if repo_id and repo_id != home and "not in the manifest" in str(e):
            raise DownloadError(f"{e}; {repo_id} does not publish {variant}, {home} does "
                                "(drop --repo-id / MATCHED_FINEWEB_REPO_ID)") from None
        raise
    # Files already in place were verified before being renamed there; re-check only their size.
    todo = [rel for rel in files
            if not (local_path(data_dir, rel).is_file()
                    and check_file(local_path(data_dir, rel), known.get(rel, {}), hash_it=False) is None)]
    print(f"{len(files) - len(todo)} of {len(files)} files already complete", file=sys.stderr)
    for rel in tqdm(todo, unit="file", desc="downloading", file=sys.stderr, disable=not progress):
        fetch_verified(fetcher, remote_root, rel, local_path(data_dir, rel), staging, known.get(rel, {}))
    shutil.rmtree(staging, ignore_errors=True)  # everything is in place; drop resume state
    update_shard_manifest(data_dir, variant, find_entries(manifest, variant)[1])
    return [local_path(data_dir, rel) for rel in files]


def update_shard_manifest(data_dir: Path, variant: str, tok: dict) -> None:
    """Rewrite the variant's shard manifest over every shard in its folder: train shards fetched by an
    earlier run with a larger --train-shards count too, since train_gpt.py reads them all."""
    if not tok.get("model_path"):  # e.g. a byte-level tokenizer: no SentencePiece model to describe
        print(f"note: {variant} has no SentencePiece tokenizer, so no shard manifest", file=sys.stderr)
        return
    try:
        write_manifest(local_path(data_dir, dataset_dir(variant)), local_path(data_dir, tok["model_path"]),
                       "data/cached_challenge_fineweb.py")
    except (BuildError, OSError) as e:
        raise DownloadError(f"cannot write the shard manifest of {variant}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    head, body = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(description=head, epilog=body, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sp1024",
                    help="sp1024, sp4096, sp8192 or sp8192_caseops (any sp<V> the manifest lists): "
                         "dataset fineweb10B_<variant>")
    ap.add_argument("--train-shards", type=int, default=80,
                    help="leading training shards of 100M tokens (default 80; the sp8192 records used 128)")
    homes = ", ".join(f"{v}: {r}" for v, r in VARIANT_REPO_IDS.items())
    ap.add_argument("--repo-id", default=None,
                    help="dataset repo (default: env MATCHED_FINEWEB_REPO_ID if set, else by variant: "
                         f"{homes}, any other variant: {OFFICIAL_REPO_ID})")
    ap.add_argument("--remote-root", default=REMOTE_ROOT,
                    help="export folder in the repo (env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)")
    ap.add_argument("--revision", help="branch, tag or commit of the repo")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR,
                    help="where datasets/ and tokenizers/ go (default: this folder)")
    args = ap.parse_args(argv)
    try:
        fetcher = HubFetcher(repo_id_for(args.variant, args.repo_id), args.revision)
        paths = download(args.variant, args.train_shards, fetcher=fetcher,
                         data_dir=args.data_dir, remote_root=args.remote_root.strip("/"))
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, OfflineError) else 1
    print(f"done: {len(paths)} files under {args.data_dir / 'datasets'} and {args.data_dir / 'tokenizers'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
