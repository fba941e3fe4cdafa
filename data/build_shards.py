#!/usr/bin/env python3
"""Build challenge-format token shards from any text, and optionally train the tokenizer first.

Documents:
  * .jsonl: one JSON object per line; the document is its "text" field (blank lines are skipped).
  * .txt:   documents are separated by one or more blank lines (a paragraph is a document).
  * a directory: every .txt/.jsonl file below it, in sorted path order.

Output (what train_gpt.py reads): DIR/fineweb_val_000000.bin, DIR/fineweb_train_000000.bin, ...
Each file is a 256 x int32 header (magic 20240520, version 1, token count) followed by the tokens
as uint16. Every document is BOS + its tokens (no EOS); documents run on across shard boundaries.
Validation is the first --val-docs documents of --input (default 50,000, like the challenge), or the
documents of --val-input (all of them, or its first --val-docs). Training is every other document.

Beside the shards, DIR/manifest.json records the tokenizer (file name, sha256, vocab size) and each split's
shards, tokens and documents, so that train_gpt.py can refuse shards evaluated with another tokenizer.

--caseops tokenizes the CaseOps transform of every document (data/caseops.py: lowercase text plus case
operators, which --train-tokenizer reserves as user-defined symbols) and writes the validation byte sidecar
DIR/fineweb_val_bytes_000000.bin, ...: the same header, then one uint16 per validation token, the original
UTF-8 bytes it stands for (0 for BOS and operators), from which train_gpt.py charges bpb. --byte-sidecar
writes the sidecar for a plain tokenizer (bpb on the original bytes rather than the tokenizer's pieces).

Examples:
  python data/build_shards.py --input text/*.jsonl --tokenizer tok.model --output data/datasets/mine
  python data/build_shards.py --input corpus/ --tokenizer data/tokenizers/my_8192_bpe.model \\
      --train-tokenizer 8192 --val-docs 1000   # -> data/datasets/fineweb10B_sp8192_sample
  python data/build_shards.py --input corpus/ --tokenizer data/tokenizers/my_8192_caseops.model \\
      --train-tokenizer 8192 --caseops         # -> data/datasets/fineweb10B_sp8192_caseops_sample
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

import caseops  # data/ is on sys.path when run as a script

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
SHARD_TOKENS = 100_000_000
VAL_DOCS = 50_000
MAX_VOCAB = 1 << 16  # token ids are stored as uint16, so ids must stay <= 65535
DATA_DIR = Path(__file__).resolve().parent
SHARD_NAME = re.compile(r"fineweb_(train|val)_\d{6}\.bin")
SIDECAR_SPLIT = "val_bytes"  # fineweb_val_bytes_NNNNNN.bin: validation only, aligned with fineweb_val_NNNNNN.bin
SIDECAR_NAME = re.compile(r"fineweb_val_bytes_\d{6}\.bin")
BATCH_DOCS, BATCH_CHARS = 256, 1 << 20  # per worker task: big enough to amortise IPC, small in memory
MANIFEST_NAME, MANIFEST_FORMAT = "manifest.json", 1
COUNT_CHUNK = 1 << 24  # tokens per read when counting documents: a 100M-token shard never sits in memory


class BuildError(Exception):
    """A problem with the input, tokenizer or output, reported to the user without a traceback."""


# ---- shard files ---------------------------------------------------------------------------------

def shard_header(num_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, num_tokens
    return header.tobytes()


def write_shard(path: str | Path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise BuildError(f"{path}: token ids must fit in uint16")
    with open(path, "wb") as f:
        f.write(shard_header(tokens.size))
        f.write(tokens.astype("<u2").tobytes())


def shard_length(path: str | Path) -> int:
    """The token count in a shard's header, checked against the header and the file's exact size."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != MAGIC or header[1] != VERSION:
        raise BuildError(f"{path}: not a shard (bad header)")
    n, size = int(header[2]), path.stat().st_size
    if size != HEADER_BYTES + 2 * n:
        raise BuildError(f"{path}: header says {n} tokens ({HEADER_BYTES + 2 * n} bytes) but file has {size} bytes")
    return n


def read_shard(path: str | Path) -> np.ndarray:
    """Return the tokens of a shard, checking its header and exact size."""
    shard_length(path)
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)


def shard_chunks(path: str | Path) -> Iterator[np.ndarray]:
    """A shard's values through a memory map, chunk by chunk."""
    n = shard_length(path)
    if n:  # np.memmap cannot map zero bytes
        values = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
        yield from (values[i:i + COUNT_CHUNK] for i in range(0, n, COUNT_CHUNK))


def count_documents(path: str | Path) -> int:
    """The BOS tokens in a shard (one per document)."""
    return sum(int(np.count_nonzero(c == BOS_ID)) for c in shard_chunks(path))


def sidecar_bytes(path: str | Path) -> int:
    """The original UTF-8 bytes a byte sidecar shard charges."""
    return sum(int(c.sum(dtype=np.int64)) for c in shard_chunks(path))


class ShardWriter:
    """Streams one split into shards of exactly `shard_tokens` tokens (the last one may be shorter)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.dir, self.split, self.cap = directory, split, shard_tokens
        self.paths: list[Path] = []
        self.file, self.fill = None, 0

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.file is None:
                self.paths.append(self.dir / f"fineweb_{self.split}_{len(self.paths):06d}.bin")
                self.file, self.fill = open(self.paths[-1], "wb"), 0
                self.file.write(bytes(HEADER_BYTES))  # real header written once the count is known
            take = min(self.cap - self.fill, tokens.size)
            self.file.write(tokens[:take].astype("<u2", copy=False).tobytes())
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.cap:
                self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.write(shard_header(self.fill))
            self.file.close()
            self.file = None


# ---- documents -----------------------------------------------------------------------------------

def input_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl") and q.is_file())
            if not found:
                raise BuildError(f"{p}: directory contains no .txt or .jsonl files")
            files += found
        elif p.is_file():
            if p.suffix not in (".txt", ".jsonl"):
                raise BuildError(f"{p}: unsupported file type (expected .txt or .jsonl)")
            files.append(p)
        else:
            raise BuildError(f"{p}: no such file or directory")
    return files


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    """Yield documents one at a time (streaming: never holds a whole file)."""
    for path in files:
        try:
            with open(path, "rb") as f:  # decoded line by line so errors name the exact line
                if path.suffix == ".jsonl":
                    for lineno, raw in enumerate(f, 1):
                        line = _decode(raw, path, lineno)
                        if line.strip():
                            yield _jsonl_text(line, path, lineno)
                else:
                    para: list[str] = []
                    for lineno, raw in enumerate(f, 1):
                        line = _decode(raw, path, lineno).rstrip("\r\n")
                        if line.strip():
                            para.append(line)
                        elif para:
                            yield "\n".join(para)
                            para = []
                    if para:
                        yield "\n".join(para)
        except OSError as e:
            raise BuildError(f"{path}: cannot read ({e.strerror or e})") from None


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BuildError(f"{path}: line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BuildError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise BuildError(f'{path}: line {lineno}: no string "text" field')
    return obj["text"]


def split_documents(inputs, val_inputs=None, val_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield ("val" | "train", document): validation first, then training, split by whole documents."""
    train_files = input_files(inputs)
    val_files = input_files(val_inputs) if val_inputs else []
    if val_files:
        docs = read_documents(val_files)
        val = docs if val_docs is None else itertools.islice(docs, val_docs)
        train = read_documents(train_files)
    else:
        train = read_documents(train_files)
        val = itertools.islice(train, VAL_DOCS if val_docs is None else val_docs)  # then train continues
    yield from (("val", d) for d in val)
    yield from (("train", d) for d in train)


def batches(tagged_docs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group documents into (split, texts) tasks; a batch never mixes the two splits."""
    split, texts, chars = None, [], 0
    for s, doc in tagged_docs:
        if texts and (s != split or len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS):
            yield split, texts
            texts, chars = [], 0
        split = s
        texts.append(doc)
        chars += len(doc)
    if texts:
        yield split, texts


# ---- tokenizer -----------------------------------------------------------------------------------

def load_tokenizer(model: str | Path) -> spm.SentencePieceProcessor:
    if not Path(model).is_file():
        raise BuildError(f"{model}: tokenizer model not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model))
    except (OSError, RuntimeError) as e:
        raise BuildError(f"{model}: not a SentencePiece model ({e})") from None
    check_vocab_size(sp.vocab_size())
    if sp.bos_id() != BOS_ID:
        raise BuildError(f"{model}: BOS id is {sp.bos_id()}, the challenge format needs {BOS_ID}")
    return sp


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size > MAX_VOCAB - 1:  # the challenge's rule: a vocab over 65,535 is refused
        raise BuildError(f"vocab size {vocab_size} is over 65,535, the largest these uint16 shards accept")


# The official builder's SentencePiece settings: openai/parameter-golf data/download_hf_docs_and_tokenize.py
# (build_sentencepiece_tokenizer), which trained the published fineweb_{1024,4096,8192}_bpe models; the
# published fineweb_1024_bpe.model records exactly these in its trainer_spec. Everything else stays at
# SentencePiece's defaults, notably max_sentence_length=4192 (bytes): longer documents are left out of
# training, as they were for the published tokenizers. hard_vocab_limit=False lets SentencePiece stop short
# of VOCAB on a small text; train_tokenizer() then refuses the result, since VOCAB_SIZE must match exactly.
SPM_TRAINER_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
    hard_vocab_limit=False)
SPM_MAX_SENTENCE_BYTES = 4192  # SentencePiece's default max_sentence_length, kept by the official builder
TOKENIZER_TRAIN_DOCS = 5_000_000  # the official sp4096/sp8192 specs' tokenizer_train_docs


def tokenizer_training_texts(docs: Iterable[str], max_docs: int = TOKENIZER_TRAIN_DOCS) -> Iterator[str]:
    """The official builder's preparation: the first max_docs documents, whole, NUL -> space, stripped,
    empty ones dropped (each document is one SentencePiece "sentence")."""
    for doc in itertools.islice(docs, max_docs):
        text = doc.replace("\x00", " ").strip()
        if text:
            yield text


def train_tokenizer(docs: Iterable[str], model: str | Path, vocab_size: int,
                    max_docs: int = TOKENIZER_TRAIN_DOCS, reserved: tuple[str, ...] = ()) -> Path:
    """Train a SentencePiece BPE model with the official builder's settings and write MODEL (+ .vocab);
    `reserved` pieces (the CaseOps operators) become user-defined symbols, ids 4, 5, ..."""
    check_vocab_size(vocab_size)
    model = Path(model)
    if model.suffix != ".model":
        raise BuildError(f"{model}: tokenizer path must end in .model")
    try:
        model.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".spm-", dir=model.parent))
    except OSError as e:
        raise BuildError(f"cannot write tokenizer to {model.parent} ({e.strerror or e})") from None
    counts = {"used": 0, "long": 0}

    def texts() -> Iterator[str]:
        for text in tokenizer_training_texts(docs, max_docs):
            counts["used" if len(text.encode("utf-8")) <= SPM_MAX_SENTENCE_BYTES else "long"] += 1
            yield text

    try:
        # num_threads only sets the speed: the pieces are the same for any value (the official run used 16)
        spm.SentencePieceTrainer.train(sentence_iterator=texts(), model_prefix=str(tmp / "m"), vocab_size=vocab_size,
                                       num_threads=os.cpu_count() or 1, minloglevel=2,
                                       user_defined_symbols=list(reserved), **SPM_TRAINER_SETTINGS)
        got = spm.SentencePieceProcessor(model_file=str(tmp / "m.model")).vocab_size()
        if got != vocab_size:
            left_out = (f"; {counts['long']:,} documents over {SPM_MAX_SENTENCE_BYTES:,} UTF-8 bytes were left out"
                        if counts["long"] else "")
            raise BuildError(f"tokenizer training failed: the text only supports {got:,} pieces, {vocab_size:,} "
                             f"were asked for (use more text or a smaller --train-tokenizer{left_out})")
        os.replace(tmp / "m.vocab", model.with_suffix(".vocab"))
        os.replace(tmp / "m.model", model)  # last, so MODEL only appears once complete
    except RuntimeError as e:
        if counts["used"] == 0 and counts["long"]:
            raise BuildError(f"tokenizer training failed: all {counts['long']:,} training documents are over "
                             f"{SPM_MAX_SENTENCE_BYTES:,} UTF-8 bytes, the most SentencePiece trains on") from None
        raise BuildError(f"tokenizer training failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if counts["long"]:
        print(f"note: {counts['long']:,} of {counts['used'] + counts['long']:,} tokenizer training documents are over "
              f"{SPM_MAX_SENTENCE_BYTES:,} UTF-8 bytes and were left out, as in the official builder", file=sys.stderr)
    return model


# ---- encoding (runs in worker processes) ---------------------------------------------------------

_SP: spm.SentencePieceProcessor | None = None
_CASEOPS, _SIDECAR = False, False


def _init_worker(model: str, caseops_on: bool = False, sidecar: bool = False) -> None:
    global _SP, _CASEOPS, _SIDECAR
    _SP, _CASEOPS, _SIDECAR = spm.SentencePieceProcessor(model_file=model), caseops_on, sidecar


def piece_original_bytes(starts: list[int], mask: np.ndarray) -> np.ndarray:
    """Each piece's original UTF-8 bytes: the mask's true bytes from its start offset to the next piece's,
    the first piece's from 0 and the last one's to the end, so whitespace the normalizer drops at either
    end of a document is charged too and the counts sum to the document's original bytes."""
    bounds = np.array([0, *starts[1:], len(mask)], dtype=np.int64)
    if np.any(np.diff(bounds) < 0):
        raise BuildError("the tokenizer's piece offsets go backwards: cannot attribute bytes")
    cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return cum[bounds[1:]] - cum[bounds[:-1]]


def encode_batch(split: str, texts: list[str]) -> tuple[np.ndarray, int, np.ndarray | None]:
    """BOS + tokens for each document, concatenated; the batch's UTF-8 byte count; for validation with a byte
    sidecar, each token's original bytes (0 for BOS), read off SentencePiece's byte offsets."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    encoded = [caseops.encode(t) for t in texts] if _CASEOPS else texts
    flat, charged = [], []
    if split == "val" and _SIDECAR:
        for text, doc in zip(encoded, _SP.encode(encoded, out_type="proto")):
            flat += [BOS_ID, *(p.id for p in doc.pieces)]
            mask = caseops.original_byte_mask(text) if _CASEOPS else np.ones(len(text.encode("utf-8")), bool)
            charged += [0, *piece_original_bytes([p.begin for p in doc.pieces], mask)] if doc.pieces else [0]
        if max(charged) >= MAX_VOCAB:
            raise BuildError(f"a token stands for {max(charged):,} bytes, more than a uint16 sidecar holds")
    else:
        for ids in _SP.encode(encoded):
            flat += [BOS_ID, *ids]
    return np.array(flat, dtype=np.uint16), n_bytes, np.array(charged, dtype=np.uint16) if charged else None


def ordered_map(fn, tasks: Iterable[tuple[str, list[str]]], model: str, workers: int, *flags: bool):
    """Yield (split, len(texts), fn(split, texts)) in input order with at most a few tasks in flight,
    so memory stays bounded however large the input (Pool.imap would read ahead without limit)."""
    if workers <= 1:
        _init_worker(model, *flags)
        for split, texts in tasks:
            yield split, len(texts), fn(split, texts)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model, *flags)) as pool:
        pending: collections.deque = collections.deque()
        for split, texts in tasks:
            pending.append((split, len(texts), pool.apply_async(fn, (split, texts))))
            if len(pending) >= 4 * workers:
                split0, n0, res = pending.popleft()
                yield split0, n0, res.get()
        while pending:
            split0, n0, res = pending.popleft()
            yield split0, n0, res.get()


# ---- manifest ------------------------------------------------------------------------------------
# DIR/manifest.json names the tokenizer the shards were made with: shards of one 1024-piece tokenizer
# evaluated with another give a wrong val_bpb and no error, so train_gpt.py checks the tokenizer against it.

def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def split_paths(shard_dir: str | Path, split: str) -> list[Path]:
    name = SIDECAR_NAME if split == SIDECAR_SPLIT else SHARD_NAME
    return sorted(p for p in Path(shard_dir).glob(f"fineweb_{split}_*.bin") if name.fullmatch(p.name))


def shard_manifest(shard_dir: str | Path, tokenizer_path: str | Path, written_by: str) -> dict:
    """The manifest of the shards now in SHARD_DIR, made with the tokenizer at TOKENIZER_PATH."""
    splits = {}
    for split in ("train", "val"):
        paths = split_paths(shard_dir, split)
        splits[split] = {"shards": len(paths), "tokens": sum(map(shard_length, paths)),
                         "documents": sum(map(count_documents, paths))}
    tokenizer = {"file": Path(tokenizer_path).name, "sha256": sha256(tokenizer_path),
                 "vocab_size": load_tokenizer(tokenizer_path).vocab_size()}
    manifest = {"format": MANIFEST_FORMAT, "tokenizer": tokenizer, "splits": splits, "written_by": written_by}
    sidecars = split_paths(shard_dir, SIDECAR_SPLIT)
    if sidecars:  # train_gpt.py refuses the shards without it: the bytes would silently be counted otherwise
        manifest["byte_sidecar"] = {"shards": len(sidecars), "tokens": sum(map(shard_length, sidecars)),
                                    "bytes": sum(map(sidecar_bytes, sidecars))}
    return manifest


def save_manifest(shard_dir: str | Path, manifest: dict) -> None:
    """Write SHARD_DIR/manifest.json atomically: a reader sees the old file or the new one, never a part."""
    path = Path(shard_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if something failed


def write_manifest(shard_dir: str | Path, tokenizer_path: str | Path, written_by: str) -> dict:
    """Count the shards in SHARD_DIR, hash the tokenizer and write SHARD_DIR/manifest.json; return it."""
    manifest = shard_manifest(shard_dir, tokenizer_path, written_by)
    save_manifest(shard_dir, manifest)
    return manifest


# ---- build ---------------------------------------------------------------------------------------

def build(inputs, tokenizer, output, *, val_inputs=None, val_docs: int | None = None,
          shard_tokens: int = SHARD_TOKENS, workers: int | None = None, progress: bool = True,
          caseops_on: bool = False, sidecar: bool = False) -> dict:
    """Tokenize documents (their CaseOps transform if caseops_on) into OUTPUT/fineweb_{val,train}_NNNNNN.bin,
    with the byte sidecar if caseops_on or sidecar, and return per-split statistics.

    Shards are written to a hidden staging directory inside OUTPUT and moved into place only after
    everything succeeded, so a failure never leaves a partial shard under a final name."""
    if shard_tokens < 1:
        raise BuildError("--shard-tokens must be positive")
    sp = load_tokenizer(tokenizer)  # validate before reading any input
    if caseops_on:
        check_caseops_tokenizer(sp, tokenizer)
    sidecar = sidecar or caseops_on
    tasks = batches(split_documents(inputs, val_inputs, val_docs))
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=output))
    except OSError as e:
        raise BuildError(f"cannot write to output directory {output} ({e.strerror or e})") from None
    stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "shards": 0} for s in ("val", "train")}
    try:
        writers = {s: ShardWriter(staging, s, shard_tokens) for s in (*stats, SIDECAR_SPLIT)}
        results = ordered_map(encode_batch, tasks, str(tokenizer), workers or os.cpu_count() or 1,
                              caseops_on, sidecar)
        with tqdm(unit="doc", file=sys.stderr, disable=not progress, desc="tokenizing") as bar:
            for split, n_docs, (tokens, n_bytes, charged) in results:
                writers[split].write(tokens)
                st = stats[split]
                st["docs"] += n_docs
                st["tokens"] += tokens.size
                st["bytes"] += n_bytes
                if charged is not None:
                    writers[SIDECAR_SPLIT].write(charged)
                    st["charged"] = st.get("charged", 0) + int(charged.sum(dtype=np.int64))
                bar.update(n_docs)
                bar.set_postfix(split=split, tokens=f"{st['tokens']:,}", refresh=False)
        for w in writers.values():
            w.close()
        for s in stats:
            stats[s]["shards"] = len(writers[s].paths)
        if stats["val"]["docs"] == 0:
            raise BuildError("no validation documents (the input is empty)")
        if stats["train"]["docs"] == 0:
            raise BuildError(f"no training documents: all {stats['val']['docs']} went to validation "
                             "(lower --val-docs or use --val-input)")
        # counted in staging, where shards already bear their final names: a mismatch keeps the old dataset
        manifest = checked_manifest(staging, tokenizer, stats)
        for old in output.iterdir():  # never mix with shards (sidecar, manifest) of an earlier build
            if SHARD_NAME.fullmatch(old.name) or SIDECAR_NAME.fullmatch(old.name) or old.name == MANIFEST_NAME:
                old.unlink()
        for w in writers.values():
            for p in w.paths:
                os.replace(p, output / p.name)
        save_manifest(output, manifest)
    except OSError as e:
        raise BuildError(f"cannot write shards to {output} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def checked_manifest(staging: Path, tokenizer, stats: dict) -> dict:
    """The manifest of the staged shards, which must hold what the build counted while writing them."""
    manifest = shard_manifest(staging, tokenizer, "data/build_shards.py")
    for split, st in stats.items():
        want = {"shards": st["shards"], "tokens": st["tokens"], "documents": st["docs"]}
        got = manifest["splits"][split]
        if got != want:
            raise BuildError(f"{split} shards on disk hold {got}, but the build wrote {want}")
    val = stats["val"]
    want = {"shards": val["shards"], "tokens": val["tokens"], "bytes": val["charged"]} if "charged" in val else None
    if manifest.get("byte_sidecar") != want:
        raise BuildError(f"the byte sidecar on disk holds {manifest.get('byte_sidecar')}, the build wrote {want}")
    return manifest


def check_caseops_tokenizer(sp: spm.SentencePieceProcessor, model) -> None:
    """--caseops needs the operators as pieces of their own (user-defined symbols)."""
    missing = [f"U+{ord(op):04X}" for op in caseops.OPERATORS if sp.piece_to_id(op) == sp.unk_id()]
    if missing:
        raise BuildError(f"{model}: --caseops needs a tokenizer with the CaseOps operators reserved, and "
                         f"{', '.join(missing)} are not (train one with --train-tokenizer VOCAB --caseops)")


def summary(stats: dict) -> str:
    lines = []
    for split, st in stats.items():
        text_tokens = st["tokens"] - st["docs"]  # minus one BOS per document
        bpt = st["bytes"] / text_tokens if text_tokens else float("nan")
        lines.append(f"{split:>5}: {st['docs']:,} documents, {st['tokens']:,} tokens incl. BOS "
                     f"in {st['shards']} shard(s), {st['bytes']:,} UTF-8 bytes, {bpt:.3f} bytes/token")
        if "charged" in st:
            lines.append(f"       byte sidecar: {st['charged']:,} bytes charged"
                         + ("" if st["charged"] == st["bytes"] else " (documents without a token charge none)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    head, body = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(description=head, epilog=body, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".txt/.jsonl files or directories")
    ap.add_argument("--tokenizer", required=True, metavar="MODEL",
                    help="SentencePiece .model (written if --train-tokenizer)")
    ap.add_argument("--output", metavar="DIR",
                    help="default: data/datasets/fineweb10B_sp<VOCAB>_sample (_caseops_sample with --caseops)")
    ap.add_argument("--val-input", nargs="+", metavar="PATH", help="take validation documents from here instead")
    ap.add_argument("--val-docs", type=int, metavar="N",
                    help=f"validation documents (default {VAL_DOCS:,} from --input; all of --val-input)")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, metavar="N")
    ap.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                    help="first train a BPE tokenizer of this size (e.g. 1024, 4096, 8192) on the first "
                         f"{TOKENIZER_TRAIN_DOCS:,} training documents with the official builder's settings, "
                         "written to MODEL (+ .vocab)")
    ap.add_argument("--caseops", action="store_true",
                    help="tokenize the CaseOps transform (data/caseops.py; --train-tokenizer reserves its "
                         "operators) and write the validation byte sidecar fineweb_val_bytes_*.bin")
    ap.add_argument("--byte-sidecar", action="store_true",
                    help="write the byte sidecar with a plain tokenizer too (bpb on the original bytes)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: all cores)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.val_docs is not None and args.val_docs < 0:
        ap.error("--val-docs must be >= 0")
    t0 = time.time()
    try:
        if args.train_tokenizer:
            docs = (d for s, d in split_documents(args.input, args.val_input, args.val_docs) if s == "train")
            print(f"training a {args.train_tokenizer}-piece BPE tokenizer ...", file=sys.stderr)
            train_tokenizer(map(caseops.encode, docs) if args.caseops else docs, args.tokenizer,
                            args.train_tokenizer, reserved=caseops.OPERATORS if args.caseops else ())
            print(f"wrote {args.tokenizer} ({time.time() - t0:.1f}s)")
        vocab = load_tokenizer(args.tokenizer).vocab_size()
        name = f"fineweb10B_sp{vocab}_{'caseops_' if args.caseops else ''}sample"
        output = args.output or DATA_DIR / "datasets" / name
        stats = build(args.input, args.tokenizer, output, val_inputs=args.val_input, val_docs=args.val_docs,
                      shard_tokens=args.shard_tokens, workers=args.workers, progress=not args.no_progress,
                      caseops_on=args.caseops, sidecar=args.byte_sidecar)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(stats))
    print(f"wrote {output} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
