"""Tests for data/build_shards.py and data/cached_challenge_fineweb.py (issues 5 and 14; shard manifest).

Everything is made here: a small synthetic corpus, a tokenizer trained on it by the tool, and a fake
Hugging Face Hub for the downloader. Nothing is read from outside the temporary directories.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
sys.path.insert(0, str(DATA))
import build_shards as bs  # noqa: E402
import cached_challenge_fineweb as dl  # noqa: E402

VOCAB = 400
WORDS = ["".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=2 + i % 7)) for i in range(300)]


def make_doc(rng: random.Random) -> str:
    sents = []
    for _ in range(rng.randint(1, 8)):
        words = rng.choices(WORDS, k=rng.randint(3, 20))
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        if rng.random() < 0.1:
            words.append(rng.choice(["café", "naïve", "“quoted”", "Zürich"]))
        sents.append(" ".join(words).capitalize() + ".")
    return "\n".join(sents) if rng.random() < 0.3 else " ".join(sents)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def stream(sp, docs) -> np.ndarray:
    """The expected token stream, computed independently of the tool: BOS + ids per document."""
    out: list[int] = []
    for d in docs:
        out += [1] + sp.encode(d)
    return np.array(out, dtype=np.uint16)


def shards(directory: Path, split: str) -> list[Path]:
    return sorted(directory.glob(f"fineweb_{split}_*.bin"))


def read_split(directory: Path, split: str) -> np.ndarray:
    return np.concatenate([bs.read_shard(p) for p in shards(directory, split)])


def shard_counts(blobs: list[bytes]) -> dict:
    """A split's manifest entry, counted from raw shard bytes without the tools' code."""
    headers = [np.frombuffer(b[:1024], dtype="<i4") for b in blobs]
    return {"shards": len(blobs), "tokens": sum(int(h[2]) for h in headers),
            "documents": sum(int(np.count_nonzero(np.frombuffer(b[1024:], dtype="<u2") == 1)) for b in blobs)}


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text(encoding="utf-8"))


def leftovers(directory: Path) -> list[str]:
    """Shards under final names or staging left behind in `directory`."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(("fineweb_", ".build-")))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    docs = [make_doc(rng) for _ in range(240)]
    val_docs = [make_doc(rng) for _ in range(12)]
    model = bs.train_tokenizer(iter(docs), root / "tok" / "tiny_bpe.model", VOCAB)
    return {"root": root, "docs": docs, "val_docs": val_docs, "model": model,
            "jsonl": write_jsonl(root / "train.jsonl", docs), "val_jsonl": write_jsonl(root / "val.jsonl", val_docs),
            "sp": spm.SentencePieceProcessor(model_file=str(model))}


@pytest.fixture(scope="session")
def built(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("built")
    stats = bs.build([corpus["jsonl"]], corpus["model"], out, val_docs=7, shard_tokens=997, workers=1, progress=False)
    return {"out": out, "stats": stats}


# ---- tokenizer -----------------------------------------------------------------------------------

def test_trained_tokenizer_has_challenge_settings(corpus):
    sp = corpus["sp"]
    assert sp.vocab_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(4 + b) for b in range(256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert sp.id_to_piece(260) not in ("<0xFF>", "<unk>")  # merges follow the byte pieces
    # byte fallback: a character never seen in training becomes its UTF-8 bytes, not <unk>
    ids = sp.encode("龘")
    assert ids == [4 + b for b in "龘".encode("utf-8")] and sp.decode(ids) == "龘"
    assert sp.encode("99999 00000", out_type=str) == list("99999") + ["▁", *"00000"]  # split digits
    assert not sp.encode("abc", out_type=str)[0].startswith("▁")  # no dummy prefix ...
    assert sp.encode("x abc", out_type=str)[1].startswith("▁")  # ... though inner spaces do become ▁
    assert sp.encode("ﬁ") == sp.encode("fi")  # nmt_nfkc


def test_vocab_over_uint16_is_refused(corpus, tmp_path):
    bs.check_vocab_size(65535)
    with pytest.raises(bs.BuildError, match="uint16"):
        bs.check_vocab_size(65536)
    with pytest.raises(bs.BuildError, match="uint16"):
        bs.train_tokenizer(iter(corpus["docs"]), tmp_path / "big.model", 70000)
    assert not (tmp_path / "big.model").exists()


def test_tokenizer_training_failure_is_clear_and_leaves_no_model(tmp_path):
    # hard_vocab_limit=False (the official setting) would quietly give 291 pieces: we refuse that
    with pytest.raises(bs.BuildError, match="tokenizer training failed: the text only supports 291 pieces"):
        bs.train_tokenizer(iter(["tiny text only"]), tmp_path / "t.model", 5000)
    with pytest.raises(bs.BuildError, match="all 2 training documents are over 4,192 UTF-8 bytes"):
        bs.train_tokenizer(iter(["x" * 4193, "y" * 5000]), tmp_path / "t.model", 300)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_trainer_settings_are_the_official_ones():
    """openai/parameter-golf data/download_hf_docs_and_tokenize.py, build_sentencepiece_tokenizer: the
    settings that trained the published fineweb_{1024,4096,8192}_bpe models (the sp1024 model's
    trainer_spec records exactly these; everything else is SentencePiece's default)."""
    assert bs.SPM_TRAINER_SETTINGS == dict(
        model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        hard_vocab_limit=False)
    assert bs.TOKENIZER_TRAIN_DOCS == 5_000_000 and bs.SPM_MAX_SENTENCE_BYTES == 4192
    # its text preparation: the first N whole documents, NUL -> space, stripped, empty ones dropped
    docs = iter([" a\x00b \n", "", "  \n ", "c\nd", "never read"])
    assert list(bs.tokenizer_training_texts(docs, max_docs=4)) == ["a b", "c\nd"]


def test_tokenizer_training_skips_documents_over_4192_bytes(corpus, tmp_path, capsys):
    """Whole documents are SentencePiece sentences, so one over max_sentence_length (4,192 bytes) is left
    out of training, as in the official builder: its made-up word never becomes a piece."""
    long_doc = " ".join(["qzqzqzq"] * 700)  # 5,599 bytes
    model = bs.train_tokenizer(iter(corpus["docs"] + [long_doc]), tmp_path / "t.model", VOCAB)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert not any("qzq" in sp.id_to_piece(i) for i in range(sp.vocab_size()))
    assert "1 of 241 tokenizer training documents are over 4,192 UTF-8 bytes" in capsys.readouterr().err
    short = bs.train_tokenizer(iter(corpus["docs"] + [" ".join(["qzqzqzq"] * 500)]), tmp_path / "s.model", VOCAB)
    sp = spm.SentencePieceProcessor(model_file=str(short))
    assert any("qzq" in sp.id_to_piece(i) for i in range(sp.vocab_size()))


# ---- shards --------------------------------------------------------------------------------------

def test_shards_round_trip(corpus, built):
    out, sp, docs = built["out"], corpus["sp"], corpus["docs"]
    for split, expected in (("val", stream(sp, docs[:7])), ("train", stream(sp, docs[7:]))):
        paths = shards(out, split)
        assert [p.name for p in paths] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(paths))]
        counts = []
        for p in paths:
            header = np.fromfile(p, dtype="<i4", count=256)
            assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
            assert p.stat().st_size == 1024 + 2 * int(header[2])
            counts.append(int(header[2]))
        assert all(c == 997 for c in counts[:-1]) and 0 < counts[-1] <= 997
        assert sum(counts) == expected.size == built["stats"][split]["tokens"]
        np.testing.assert_array_equal(read_split(out, split), expected)
    assert built["stats"]["train"]["shards"] > 2  # documents really ran across shard boundaries


def test_build_writes_manifest_of_its_shards(corpus, built):
    out, sp, docs = built["out"], corpus["sp"], corpus["docs"]
    manifest, model_sha = read_manifest(out), hashlib.sha256(corpus["model"].read_bytes()).hexdigest()
    assert manifest == {
        "format": 1,
        "tokenizer": {"file": "tiny_bpe.model", "sha256": model_sha, "vocab_size": VOCAB},
        "splits": {s: shard_counts([p.read_bytes() for p in shards(out, s)]) for s in ("train", "val")},
        "written_by": "data/build_shards.py"}
    # and what the corpus says: one BOS per document, BOS + tokens per document
    for split, split_docs in (("val", docs[:7]), ("train", docs[7:])):
        got = manifest["splits"][split]
        assert (got["documents"], got["tokens"]) == (len(split_docs), stream(sp, split_docs).size)
    assert manifest["splits"]["train"]["shards"] > 2  # counts summed over several shards
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("fineweb_")) == ["manifest.json"]


def test_manifest_counts_documents_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "COUNT_CHUNK", 3)  # BOS tokens on both sides of every chunk border
    tokens = [1, 5, 1, 1, 7, 8, 1, 9, 1, 1]
    bs.write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    bs.write_shard(tmp_path / "fineweb_val_000000.bin", [])
    assert bs.count_documents(tmp_path / "fineweb_train_000000.bin") == tokens.count(1)
    assert bs.count_documents(tmp_path / "fineweb_val_000000.bin") == 0


def test_manifest_write_is_atomic(corpus, built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    before = (out / "manifest.json").read_bytes()
    # json.dump writes everything before this value to the temporary file, then fails on it
    with pytest.raises(TypeError):
        bs.write_manifest(out, corpus["model"], written_by=object())
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if "manifest" in p.name) == ["manifest.json"]


def test_document_boundaries_are_exactly_one_bos(corpus, built):
    sp, train_docs = corpus["sp"], corpus["docs"][7:]
    tokens = read_split(built["out"], "train")
    assert 2 not in tokens  # no EOS
    starts = np.flatnonzero(tokens == 1)
    assert starts[0] == 0 and len(starts) == len(train_docs) == built["stats"]["train"]["docs"]
    for doc, piece in zip(train_docs, np.split(tokens, starts[1:])):
        assert piece[0] == 1 and piece[1:].tolist() == sp.encode(doc)


def test_validation_split_is_by_document(corpus, tmp_path):
    sp, docs, val_docs = corpus["sp"], corpus["docs"], corpus["val_docs"]
    # from a separate file: all of it, then only its first 3 documents; training keeps every input doc
    for n, expected in ((None, val_docs), (3, val_docs[:3])):
        out = tmp_path / f"v{n}"
        stats = bs.build([corpus["jsonl"]], corpus["model"], out, val_inputs=[corpus["val_jsonl"]],
                         val_docs=n, shard_tokens=10**6, workers=2, progress=False)
        assert stats["val"]["docs"] == len(expected) and stats["train"]["docs"] == len(docs)
        np.testing.assert_array_equal(read_split(out, "val"), stream(sp, expected))
        np.testing.assert_array_equal(read_split(out, "train"), stream(sp, docs))


def test_workers_and_cli_give_identical_shards(corpus, built, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, str(DATA / "build_shards.py"), "--input", str(corpus["jsonl"]),
                        "--tokenizer", str(corpus["model"]), "--output", str(out), "--val-docs", "7",
                        "--shard-tokens", "997", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{len(corpus['docs']) - 7:,} documents" in r.stdout and "bytes/token" in r.stdout
    names = [p.name for p in shards(built["out"], "*")]
    assert names == [p.name for p in shards(out, "*")]
    for name in names + ["manifest.json"]:
        assert (out / name).read_bytes() == (built["out"] / name).read_bytes()


def test_txt_paragraphs_and_directories(corpus, tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("First para\nstill first.\n\n\n  \nSecond para.\n\nThird", encoding="utf-8")
    write_jsonl(d / "sub" / "b.jsonl", ["json doc one", "json doc two"])
    (d / "ignored.csv").write_text("x,y\n")
    docs = ["First para\nstill first.", "Second para.", "Third", "json doc one", "json doc two"]
    assert list(bs.read_documents(bs.input_files([d]))) == docs
    stats = bs.build([d], corpus["model"], tmp_path / "out", val_docs=2, workers=1, progress=False)
    assert (stats["val"]["docs"], stats["train"]["docs"]) == (2, 3)
    np.testing.assert_array_equal(read_split(tmp_path / "out", "train"), stream(corpus["sp"], docs[2:]))


def test_rebuild_replaces_old_shards(corpus, tmp_path):
    out = tmp_path / "out"
    bs.build([corpus["jsonl"]], corpus["model"], out, val_docs=7, shard_tokens=500, workers=1, progress=False)
    assert len(shards(out, "train")) > 3
    bs.build([corpus["jsonl"]], corpus["model"], out, val_docs=7, shard_tokens=10**6, workers=1, progress=False)
    assert leftovers(out) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    train = shard_counts([(out / "fineweb_train_000000.bin").read_bytes()])
    assert read_manifest(out)["splits"]["train"] == train  # not the first build's


# ---- bad input -----------------------------------------------------------------------------------

BAD_INPUTS = {
    "empty": (b"", "empty"),
    "missing_text": (b'{"text": "fine"}\n{"body": "no text here"}\n', 'line {n}: no string "text" field'),
    "invalid_json": (b'{"text": "fine"}\n{"text": \n', "line {n}: invalid JSON"),
    "undecodable": (b'{"text": "fine"}\n{"text": "caf\xe9 \xff"}\n', "line {n}: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_clear_error_and_no_shards(corpus, tmp_path, case):
    content, message = BAD_INPUTS[case]
    bad = tmp_path / "bad.jsonl"
    # the bad line comes after many good documents, so shards were already written when it is read
    bad.write_bytes(corpus["jsonl"].read_bytes() + content if case != "empty" else content)
    out = tmp_path / "out"
    with pytest.raises(bs.BuildError) as err:
        bs.build([bad], corpus["model"], out, val_docs=7, shard_tokens=500, workers=2, progress=False)
    assert message.format(n=len(corpus["docs"]) + 2) in str(err.value) and (case == "empty" or "bad.jsonl" in str(err.value))
    assert leftovers(out) == [] and not (out / "manifest.json").exists()


def test_failed_build_keeps_previous_dataset_intact(corpus, built, tmp_path):
    out = tmp_path / "out"
    bs.build([corpus["jsonl"]], corpus["model"], out, val_docs=7, shard_tokens=997, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good paragraph\n\nbad \xc3\x28 bytes\n")
    with pytest.raises(bs.BuildError, match="bad.txt: line 3: not valid UTF-8"):
        bs.build([bad], corpus["model"], out, val_docs=1, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_other_bad_arguments(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(bs.BuildError, match="cannot write to output directory"):
        bs.build([corpus["jsonl"]], corpus["model"], blocker / "out", val_docs=7, workers=1, progress=False)
    with pytest.raises(bs.BuildError, match="no such file"):
        bs.build([tmp_path / "missing.jsonl"], corpus["model"], tmp_path / "o1", progress=False)
    with pytest.raises(bs.BuildError, match="no training documents"):
        bs.build([corpus["val_jsonl"]], corpus["model"], tmp_path / "o2", val_docs=100, workers=1, progress=False)
    with pytest.raises(bs.BuildError, match="not a SentencePiece model"):
        bs.build([corpus["jsonl"]], blocker, tmp_path / "o3", progress=False)
    for d in ("o1", "o2"):
        assert not (tmp_path / d).exists() or leftovers(tmp_path / d) == []


def test_cli_error_and_tokenizer_training(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    cmd = [sys.executable, str(DATA / "build_shards.py"), "--no-progress", "--tokenizer"]
    r = subprocess.run(cmd + [str(corpus["model"]), "--input", str(bad), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'bad.jsonl: line 2: no string "text" field' in r.stderr
    assert "Traceback" not in r.stderr and leftovers(tmp_path / "o") == []
    # train a tokenizer from the training documents and build with it, in one command
    model = tmp_path / "tok" / "new_360_bpe.model"
    r = subprocess.run(cmd + [str(model), "--train-tokenizer", "360", "--input", str(corpus["jsonl"]),
                              "--val-input", str(corpus["val_jsonl"]), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 360 and sp.bos_id() == 1
    np.testing.assert_array_equal(read_split(tmp_path / "o", "val"), stream(sp, corpus["val_docs"]))


# ---- download (against a fake hub) ---------------------------------------------------------------

class FakeHub:
    """Stands in for HubFetcher: serves `files`, resumes from a partial file in staging like
    huggingface_hub does, and can be told to drop the connection halfway through a file."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.calls, self.resumed_at, self.cut, self.offline = dict(files), [], {}, set(), False

    def fetch(self, remote: str, staging: Path) -> Path:
        self.calls.append(remote)
        if self.offline:
            raise dl.OfflineError("cannot reach the Hugging Face Hub: you seem to be offline")
        if remote not in self.files:
            raise dl.DownloadError(f"{remote} not found")
        data, part, final = self.files[remote], staging / ".incomplete" / remote, staging / remote
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        self.resumed_at[remote] = have
        with open(part, "ab") as f:
            if remote in self.cut:
                self.cut.discard(remote)
                f.write(data[have:len(data) // 2])
                raise dl.OfflineError("connection lost")
            f.write(data[have:])
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        return final


def shard_bytes(tokens) -> bytes:
    return bs.shard_header(len(tokens)) + np.asarray(tokens, dtype="<u2").tobytes()


# The fake exports' tokenizers are real SentencePiece models (the shard manifest reads their vocab size),
# each with its own piece count so that a manifest shows which one it hashed. They are far smaller than
# their variant's name says, which nothing in the downloader checks.
TINY_PIECES = {64: 340, 1024: 350, 4096: 360, 8192: 370}


@functools.lru_cache(maxsize=None)
def tiny_model(pieces: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        docs = [make_doc(random.Random(pieces * 1000 + i)) for i in range(60)]
        return bs.train_tokenizer(iter(docs), Path(d) / "t.model", pieces).read_bytes()


def hub_files(root="root", with_files_table=True) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    d = "datasets/fineweb10B_sp64"
    blobs = {f"{d}/fineweb_val_{i:06d}.bin": shard_bytes(rng.integers(0, 64, 300 + i)) for i in range(2)}
    blobs.update({f"{d}/fineweb_train_{i:06d}.bin": shard_bytes(rng.integers(0, 64, 500 + i)) for i in range(3)})
    blobs["tokenizers/fineweb_64_bpe.model"] = tiny_model(TINY_PIECES[64])
    blobs["tokenizers/fineweb_64_bpe.vocab"] = b"vocab\n" * 5
    manifest = {
        "datasets": [{"name": "fineweb10B_sp64", "tokenizer_name": "sp_bpe_64",
                      "stats": {"files_train": 3, "files_val": 2}}],
        "tokenizers": [{"name": "sp_bpe_64", "model_path": "tokenizers/fineweb_64_bpe.model",
                        "vocab_path": "tokenizers/fineweb_64_bpe.vocab"}],
    }
    if with_files_table:
        manifest["files"] = {k: {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in blobs.items()}
    blobs["manifest.json"] = json.dumps(manifest).encode()
    return {f"{root}/{k}": v for k, v in blobs.items()}


WANTED = ["datasets/fineweb10B_sp64/fineweb_val_000000.bin", "datasets/fineweb10B_sp64/fineweb_val_000001.bin",
          "datasets/fineweb10B_sp64/fineweb_train_000000.bin", "datasets/fineweb10B_sp64/fineweb_train_000001.bin",
          "tokenizers/fineweb_64_bpe.model", "tokenizers/fineweb_64_bpe.vocab"]


def get(hub, data_dir, train_shards=2):
    return dl.download("sp64", train_shards, fetcher=hub, data_dir=data_dir, remote_root="root", progress=False)


def assert_complete(hub, data_dir):
    for rel in WANTED:
        assert (data_dir / rel).read_bytes() == hub.files[f"root/{rel}"]
    assert not (data_dir / "datasets/fineweb10B_sp64/fineweb_train_000002.bin").exists()
    assert not (data_dir / "datasets/.staging").exists()


def test_download_fresh_then_already_complete(tmp_path):
    hub = FakeHub(hub_files())
    assert get(hub, tmp_path) == [tmp_path / rel for rel in WANTED]
    assert_complete(hub, tmp_path)
    assert hub.calls == ["root/manifest.json"] + [f"root/{rel}" for rel in WANTED]
    hub.calls.clear()
    get(hub, tmp_path)  # second run: only the manifest is refreshed
    assert hub.calls == ["root/manifest.json"]
    hub.calls.clear()
    get(hub, tmp_path, train_shards=3)  # asking for more fetches just the new shard
    assert hub.calls[1:] == ["root/datasets/fineweb10B_sp64/fineweb_train_000002.bin"]


def hub_manifest(hub, variant: str, vocab: int, n_train: int, root: str = "root") -> dict:
    """The shard manifest expected after downloading `n_train` training shards, from the hub's own bytes."""
    def split(name: str, n: int | None) -> dict:
        prefix = f"{root}/datasets/fineweb10B_{variant}/fineweb_{name}_"
        return shard_counts([v for k, v in sorted(hub.files.items()) if k.startswith(prefix)][:n])
    model = hub.files[f"{root}/tokenizers/fineweb_{vocab}_bpe.model"]
    return {"format": 1, "splits": {"train": split("train", n_train), "val": split("val", None)},
            "tokenizer": {"file": f"fineweb_{vocab}_bpe.model", "sha256": hashlib.sha256(model).hexdigest(),
                          "vocab_size": TINY_PIECES[vocab]},
            "written_by": "data/cached_challenge_fineweb.py"}


def test_download_writes_shard_manifest_over_present_shards(tmp_path):
    hub = FakeHub(hub_files())
    shard_dir = tmp_path / "datasets/fineweb10B_sp64"
    get(hub, tmp_path)
    assert read_manifest(shard_dir) == hub_manifest(hub, "sp64", 64, n_train=2)
    assert hub_manifest(hub, "sp64", 64, 2)["splits"]["train"]["documents"] > 0  # random tokens include BOS
    get(hub, tmp_path, train_shards=3)  # more shards fetched later: recomputed
    assert read_manifest(shard_dir) == hub_manifest(hub, "sp64", 64, n_train=3)
    get(hub, tmp_path, train_shards=1)  # fewer asked for: still every shard present, which train_gpt.py reads
    assert read_manifest(shard_dir)["splits"]["train"]["shards"] == 3
    # the source's manifest is a different file, kept where it was
    assert "datasets" in json.loads((tmp_path / "datasets/manifests/_/root/manifest.json").read_text())


def test_download_shard_manifest_needs_a_sentencepiece_tokenizer(tmp_path, capsys):
    files = hub_files(with_files_table=False)
    files["root/tokenizers/fineweb_64_bpe.model"] = b"not a model"
    with pytest.raises(dl.DownloadError, match="shard manifest of sp64: .*not a SentencePiece model"):
        get(FakeHub(files), tmp_path)
    assert (tmp_path / WANTED[0]).is_file() and not list(tmp_path.glob("datasets/*/manifest.json"))
    # a tokenizer that is no SentencePiece model at all (the byte-level export's): no manifest, said so
    manifest = json.loads(files["root/manifest.json"])
    manifest["tokenizers"][0] = {"name": "sp_bpe_64", "path": "tokenizers/fineweb_64_bpe.vocab"}
    files["root/manifest.json"] = json.dumps(manifest).encode()
    get(FakeHub(files), tmp_path / "b")
    assert (tmp_path / "b" / WANTED[0]).is_file() and not list(tmp_path.glob("b/datasets/*/manifest.json"))
    assert "sp64 has no SentencePiece tokenizer, so no shard manifest" in capsys.readouterr().err


def test_download_resumes_after_interruption(tmp_path):
    hub = FakeHub(hub_files())
    cut = "root/datasets/fineweb10B_sp64/fineweb_train_000001.bin"
    hub.cut.add(cut)
    with pytest.raises(dl.OfflineError):
        get(hub, tmp_path)
    assert (tmp_path / WANTED[2]).exists() and not (tmp_path / WANTED[3]).exists()  # nothing partial in place
    hub.calls.clear()
    get(hub, tmp_path)
    assert hub.calls == ["root/manifest.json", cut] + [f"root/{rel}" for rel in WANTED[4:]]
    assert hub.resumed_at[cut] == len(hub.files[cut]) // 2 > 0
    assert_complete(hub, tmp_path)


@pytest.mark.parametrize("table", [True, False])
def test_download_rejects_truncated_shard(tmp_path, table):
    hub = FakeHub(hub_files(with_files_table=table))
    bad = "root/datasets/fineweb10B_sp64/fineweb_train_000000.bin"
    good = hub.files[bad]
    hub.files[bad] = good[:-2]
    with pytest.raises(dl.DownloadError, match="size mismatch" if table else "truncated"):
        get(hub, tmp_path)
    assert not (tmp_path / WANTED[2]).exists() and not list(tmp_path.rglob("fineweb_train_000000.bin"))
    hub.files[bad] = good  # the hub is fixed: a re-run completes
    get(hub, tmp_path)
    assert_complete(hub, tmp_path)


def test_download_checks_manifest_size_and_hash(tmp_path):
    hub = FakeHub(hub_files())
    model = "root/tokenizers/fineweb_64_bpe.model"
    hub.files[model] = b"x" + hub.files[model][1:]  # same size, different content
    with pytest.raises(dl.DownloadError, match="sha256 mismatch"):
        get(hub, tmp_path)
    assert not (tmp_path / "tokenizers/fineweb_64_bpe.model").exists()
    hub.files[model] += b"extra"
    with pytest.raises(dl.DownloadError, match="size mismatch"):
        get(hub, tmp_path)


def test_download_replaces_corrupt_local_file(tmp_path):
    hub = FakeHub(hub_files(with_files_table=False))
    get(hub, tmp_path)
    target = tmp_path / WANTED[0]
    target.write_bytes(target.read_bytes()[:-10])  # e.g. an interrupted manual copy
    hub.calls.clear()
    get(hub, tmp_path)
    assert hub.calls == ["root/manifest.json", f"root/{WANTED[0]}"]
    assert_complete(hub, tmp_path)


def test_download_offline(tmp_path):
    hub = FakeHub(hub_files())
    hub.offline = True
    with pytest.raises(dl.OfflineError, match="offline"):
        get(hub, tmp_path)
    assert not list(tmp_path.rglob("*.bin"))
    hub.offline = False
    get(hub, tmp_path)
    hub.offline, hub.calls = True, []
    get(hub, tmp_path)  # everything is already here: offline is fine
    assert hub.calls == ["root/manifest.json"]
    with pytest.raises(dl.OfflineError):
        get(hub, tmp_path, train_shards=3)  # but a missing shard cannot be fetched


def test_download_bad_requests(tmp_path):
    hub = FakeHub(hub_files())
    with pytest.raises(dl.DownloadError, match="only 3 training shards"):
        get(hub, tmp_path, train_shards=4)
    with pytest.raises(dl.DownloadError, match="fineweb10B_sp99 is not in the manifest"):
        dl.download("sp99", 1, fetcher=hub, data_dir=tmp_path, remote_root="root", progress=False)
    with pytest.raises(dl.DownloadError, match="not found"):
        dl.download("sp64", 1, fetcher=hub, data_dir=tmp_path, remote_root="elsewhere", progress=False)


def fake_export(*vocabs: int, n_train: int = 3) -> dict[str, bytes]:
    """A published export as the official exporter lays it out (manifest fields included), under the
    root "datasets": what willdepueoai/parameter-golf holds for sp1024, kevclark/parameter-golf for sp8192."""
    blobs, manifest = {}, {"version": "10B", "num_val_docs": 50000, "shard_size": 10**8, "append_eos": False,
                           "tokenizers": [], "datasets": []}
    for vocab in vocabs:
        rng = np.random.default_rng(vocab)
        name, tok = f"fineweb10B_sp{vocab}", f"sp_bpe_{vocab}"
        blobs[f"datasets/{name}/fineweb_val_000000.bin"] = shard_bytes(rng.integers(0, vocab, 400))
        blobs.update({f"datasets/{name}/fineweb_train_{i:06d}.bin": shard_bytes(rng.integers(0, vocab, 600 + i))
                      for i in range(n_train)})
        blobs[f"tokenizers/fineweb_{vocab}_bpe.model"] = tiny_model(TINY_PIECES[vocab])
        blobs[f"tokenizers/fineweb_{vocab}_bpe.vocab"] = b"vocab %d" % vocab
        manifest["tokenizers"].append({"name": tok, "kind": "sentencepiece_bpe", "vocab_size": vocab, "bos_id": 1,
                                       "eos_id": 2, "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
                                       "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab"})
        manifest["datasets"].append({"name": name, "tokenizer_name": tok, "tokenizer_kind": "sentencepiece_bpe",
                                     "path": f"datasets/{name}", "vocab_size": vocab, "bos_id": 1, "eos_id": 2,
                                     "stats": {"docs_val": 50000, "files_val": 1, "files_train": n_train}})
    blobs["manifest.json"] = json.dumps(manifest).encode()
    return {f"datasets/{k}": v for k, v in blobs.items()}


@pytest.fixture
def hubs(monkeypatch):
    """The two real repos, faked: main() builds HubFetcher(repo_id, revision), which now picks one."""
    repos = {"willdepueoai/parameter-golf": FakeHub(fake_export(1024)),
             "kevclark/parameter-golf": FakeHub(fake_export(4096, 8192))}

    def fetcher(repo_id, revision=None):
        hub = repos.setdefault(repo_id, FakeHub({}))
        hub.repo_id = repo_id
        return hub
    monkeypatch.setattr(dl, "HubFetcher", fetcher)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    return repos


def test_repo_id_depends_on_the_variant_unless_overridden():
    assert dl.repo_id_for("sp1024", env={}) == dl.repo_id_for("byte260", env={}) == "willdepueoai/parameter-golf"
    assert dl.repo_id_for("sp8192", env={}) == dl.repo_id_for("sp4096", env={}) == "kevclark/parameter-golf"
    env = {"MATCHED_FINEWEB_REPO_ID": "me/mine"}
    assert dl.repo_id_for("sp8192", env=env) == dl.repo_id_for("sp1024", env=env) == "me/mine"
    assert dl.repo_id_for("sp8192", "flag/wins", env=env) == "flag/wins"
    assert dl.repo_id_for("sp8192", None, env={"MATCHED_FINEWEB_REPO_ID": ""}) == "kevclark/parameter-golf"


def test_download_sp8192_from_its_repo(hubs, tmp_path, capsys):
    assert dl.main(["--variant", "sp8192", "--train-shards", "2", "--data-dir", str(tmp_path)]) == 0
    kev = hubs["kevclark/parameter-golf"]
    wanted = ["datasets/fineweb10B_sp8192/fineweb_val_000000.bin", "datasets/fineweb10B_sp8192/fineweb_train_000000.bin",
              "datasets/fineweb10B_sp8192/fineweb_train_000001.bin",
              "tokenizers/fineweb_8192_bpe.model", "tokenizers/fineweb_8192_bpe.vocab"]
    assert kev.calls == ["datasets/manifest.json"] + [f"datasets/{rel}" for rel in wanted]
    assert hubs["willdepueoai/parameter-golf"].calls == []
    for rel in wanted:
        assert (tmp_path / rel).read_bytes() == kev.files[f"datasets/{rel}"]
    assert bs.read_shard(tmp_path / wanted[0]).max() < 8192
    assert not (tmp_path / "datasets/fineweb10B_sp8192/fineweb_train_000002.bin").exists()
    assert "source: kevclark/parameter-golf" in capsys.readouterr().err
    # sp4096 comes from the same repo; sp1024 still from the challenge's
    assert dl.main(["--variant", "sp4096", "--train-shards", "1", "--data-dir", str(tmp_path)]) == 0
    model = "tokenizers/fineweb_4096_bpe.model"
    assert (tmp_path / model).read_bytes() == kev.files[f"datasets/{model}"]
    assert dl.main(["--variant", "sp1024", "--train-shards", "1", "--data-dir", str(tmp_path)]) == 0
    official = hubs["willdepueoai/parameter-golf"]
    assert official.calls[0] == "datasets/manifest.json"
    model = "tokenizers/fineweb_1024_bpe.model"
    assert (tmp_path / model).read_bytes() == official.files[f"datasets/{model}"]
    # each variant's shard manifest hashes that variant's tokenizer, all three in one data/tokenizers/
    for hub, vocab, n_train in ((kev, 8192, 2), (kev, 4096, 1), (official, 1024, 1)):
        got = read_manifest(tmp_path / f"datasets/fineweb10B_sp{vocab}")
        assert got == hub_manifest(hub, f"sp{vocab}", vocab, n_train, root="datasets")
    # each source keeps its own manifest, so offline re-runs of both work
    for repo in ("kevclark/parameter-golf", "willdepueoai/parameter-golf"):
        assert json.loads((tmp_path / "datasets/manifests" / repo / "datasets/manifest.json").read_text())
        hubs[repo].offline = True
    assert dl.main(["--variant", "sp8192", "--train-shards", "2", "--data-dir", str(tmp_path)]) == 0
    assert dl.main(["--variant", "sp1024", "--train-shards", "1", "--data-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "datasets/.staging").exists()


def test_download_repo_override_wins(hubs, tmp_path, monkeypatch, capsys):
    mirror = FakeHub(fake_export(8192, n_train=1))
    hubs["me/mirror"] = mirror
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "me/mirror")  # the env var beats the variant's repo
    assert dl.main(["--variant", "sp8192", "--train-shards", "1", "--data-dir", str(tmp_path)]) == 0
    assert mirror.calls[0] == "datasets/manifest.json" and hubs["kevclark/parameter-golf"].calls == []
    assert (tmp_path / "datasets/fineweb10B_sp8192/fineweb_train_000000.bin").is_file()
    mirror.calls.clear()
    # ... and --repo-id beats the env var: sp8192 is not in the challenge's repo, and the error says where it is
    assert dl.main(["--variant", "sp8192", "--repo-id", "willdepueoai/parameter-golf",
                    "--data-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "fineweb10B_sp8192 is not in the manifest (available: fineweb10B_sp1024)" in err
    assert "kevclark/parameter-golf does" in err and mirror.calls == []
    assert hubs["willdepueoai/parameter-golf"].calls == ["datasets/manifest.json"]


CASEOPS_NAME = "sp8192_lossless_caps_caseops_v1_reserved"


def caseops_export() -> dict[str, bytes]:
    """romeerp/parameter-golf-caseops-v1 as the CaseOps records use it: the SP8192 layout under the export's
    long name, a val_bytes_glob, and a byte sidecar beside each validation shard."""
    rng = np.random.default_rng(5)
    d, tok = f"datasets/fineweb10B_{CASEOPS_NAME}", "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"
    val = rng.integers(0, 8192, 400)
    val[::50] = 1
    blobs = {f"{d}/fineweb_val_000000.bin": shard_bytes(val),
             f"{d}/fineweb_val_bytes_000000.bin": shard_bytes(np.where(val == 1, 0, rng.integers(0, 9, 400))),
             f"{d}/fineweb_train_000000.bin": shard_bytes(rng.integers(0, 8192, 600)),
             f"{tok}.model": tiny_model(TINY_PIECES[8192]), f"{tok}.vocab": b"vocab caseops"}
    manifest = {"datasets": [{"name": f"fineweb10B_{CASEOPS_NAME}", "tokenizer_name": "caseops_8192",
                              "val_bytes_glob": "fineweb_val_bytes_*.bin",
                              "stats": {"files_val": 1, "files_train": 1}}],
                "tokenizers": [{"name": "caseops_8192", "model_path": f"{tok}.model", "vocab_path": f"{tok}.vocab"}]}
    blobs["manifest.json"] = json.dumps(manifest).encode()
    return {f"datasets/{k}": v for k, v in blobs.items()}


def test_download_caseops_with_its_byte_sidecar(hubs, tmp_path):
    hub = hubs["romeerp/parameter-golf-caseops-v1"] = FakeHub(caseops_export())
    assert dl.main(["--variant", "sp8192_caseops", "--train-shards", "1", "--data-dir", str(tmp_path)]) == 0
    assert sorted(hub.calls) == sorted(hub.files) and hubs["kevclark/parameter-golf"].calls == []
    for remote, data in hub.files.items():
        if not remote.endswith("manifest.json"):
            assert (tmp_path / remote[len("datasets/"):]).read_bytes() == data
    shard_dir = tmp_path / f"datasets/fineweb10B_{CASEOPS_NAME}"
    side = bs.read_shard(shard_dir / "fineweb_val_bytes_000000.bin")
    assert read_manifest(shard_dir)["byte_sidecar"] == {"shards": 1, "tokens": 400, "bytes": int(side.sum())}
    assert read_manifest(shard_dir)["splits"]["val"]["tokens"] == 400


def test_download_refuses_unsafe_manifest_paths():
    manifest = json.loads(fake_export(8192)["datasets/manifest.json"])
    for bad in ("../../etc/x.model", "/abs/x.model"):
        manifest["tokenizers"][0]["model_path"] = bad
        with pytest.raises(dl.DownloadError, match="unsafe path"):
            dl.plan(manifest, "sp8192", 1)


def test_download_cli_offline_uses_real_hub_client(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               MATCHED_FINEWEB_REPO_ID="someone/some-repo")
    r = subprocess.run([sys.executable, str(DATA / "cached_challenge_fineweb.py"), "--variant", "sp1024",
                        "--train-shards", "1", "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "offline" in r.stderr and "someone/some-repo" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("manifest.json"))
    # without the env var, sp8192 goes to its own repo (the message names it)
    env.pop("MATCHED_FINEWEB_REPO_ID")
    r = subprocess.run([sys.executable, str(DATA / "cached_challenge_fineweb.py"), "--variant", "sp8192",
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "kevclark/parameter-golf" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(DATA / "cached_challenge_fineweb.py"), "--variant", "sp8192_caseops",
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "romeerp/parameter-golf-caseops-v1" in r.stderr and "offline" in r.stderr
