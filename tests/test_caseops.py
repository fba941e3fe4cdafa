"""CaseOps (issue 28): the lossless case transform (data/caseops.py), the shards and byte sidecar that
data/build_shards.py --caseops writes, and train_gpt.py charging bpb from the sidecar on every evaluation path.
Everything is built here from synthetic text, and from the real FineWeb sample shipped in data/sample."""
import json
import random
import re
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import ROOT, FakeCtx, doc_stream, make_text, random_model, run_script, tiny_env, write_shard
from conftest import tiny_hparams as hparams

sys.path.insert(0, str(ROOT / "data"))
import build_shards as bs  # noqa: E402
import caseops  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC = caseops.OPERATORS
SAMPLE = ROOT / "data" / "sample"


# ---------------------------------------------------------------- the transform

@pytest.mark.parametrize("text, encoded", [
    ("the cat", "the cat"),
    ("The Cat", f"{TITLE}the {TITLE}cat"),
    ("A I", f"{TITLE}a {TITLE}i"),  # one capital letter is a title, not all caps
    ("NASA and AI", f"{ALLCAPS}nasa and {ALLCAPS}ai"),
    ("iPhone", f"i{CAPNEXT}phone"),
    ("OpenAI", f"{TITLE}open{CAPNEXT}a{CAPNEXT}i"),
    ("McDonald's", f"{TITLE}mc{CAPNEXT}donald's"),
    ("ABc", f"{TITLE}a{CAPNEXT}bc"),
    ("x2Y", f"x2{TITLE}y"),  # a digit ends a word
    ("ÉCOLE ÜRBAN", f"É{ALLCAPS}cole Ü{ALLCAPS}rban"),  # only ASCII letters are transformed
    (f"a{TITLE}b{ESC}", f"a{ESC}{TITLE}b{ESC}{ESC}"),  # operator characters in the text are escaped
    ("\ue000 \ue005", "\ue000 \ue005"),  # private-use neighbours are plain text
])
def test_encode_follows_the_rules(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


ADVERSARIAL = [
    "", " ", "\n\n", "1234 5678", "!?.,;:-- ()[]{}", "ß STRASSE Straße ẞ", "İstanbul ISTANBUL ı I",
    "ǅemal ǄEMAL ǆ", "ﬁne ﬂow ﬃ ＡＢＣ ｆｕｌｌ", "e\u0301 E\u0301 A\u030a\u0323", "Ꭰ ꭰ ΣΑΣ σας ς",
    "Ⱥ ⱥ K Ω Å ŉ ǰ ΐ", "東京 Tokyo ТОКИО Токио", "🦜 Emoji 𝔘𝔫𝔦 𝐀𝐁", "\ue001\ue002\ue003\ue004",
    "\ue004\ue004A", f"{ESC}{TITLE}a", "a\x00B\tC\r\nD", "\ud7ff\U0010ffff", "Hello\u200bWorld", "ÀÉÎ àéî",
]


def random_strings(n: int, seed: int):
    """Random strings over characters that stress the rules: ASCII cases, operators and their neighbours,
    characters whose case mapping changes length, combining marks, ligatures, digits and space."""
    alphabet = "aAbBzZ mM1_\n'" + "".join(caseops.OPERATORS) + "\ue000\ue005ßİıǅﬁ\u0301ΣσςÉé東🦜"
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(n)]


def test_decode_inverts_encode_and_the_mask_counts_the_original_bytes():
    for text in ADVERSARIAL + random_strings(3000, 1):
        encoded = caseops.encode(text)
        assert caseops.decode(encoded) == text, repr(text)
        mask = caseops.original_byte_mask(encoded)
        assert mask.shape == (len(encoded.encode("utf-8")),) and mask.sum() == len(text.encode("utf-8"))
        if not any(op in text for op in caseops.OPERATORS):  # lower case text is its own encoding
            assert caseops.encode(text.lower()) == text.lower()


def test_the_mask_drops_exactly_the_acting_operators():
    encoded = caseops.encode(f"The {ESC}X")  # TITLE the ESC ESC TITLE x: an ESC escapes the text's own ESC
    assert encoded == f"{TITLE}the {ESC}{ESC}{TITLE}x"
    mask = caseops.original_byte_mask(encoded)
    first_bytes = np.cumsum([0] + [len(c.encode("utf-8")) for c in encoded[:-1]])
    assert mask[first_bytes].tolist() == [False, True, True, True, True, False, True, False, True]


def test_every_sample_document_round_trips():
    n = 0
    for path in sorted(SAMPLE.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)["text"]
            encoded = caseops.encode(doc)
            assert caseops.decode(encoded) == doc
            assert caseops.original_byte_mask(encoded).sum() == len(doc.encode("utf-8"))
            n += 1
    assert n == 374  # data/sample: 324 training and 50 validation documents


@pytest.mark.parametrize("bad", [TITLE, f"{TITLE}A", f"{TITLE} a", f"{CAPNEXT}1", ALLCAPS, f"{ALLCAPS}É",
                                 ESC, f"{ESC}a", f"a{TITLE}"])
def test_decode_refuses_what_encode_never_writes(bad):
    with pytest.raises(ValueError, match="not a CaseOps encoding"):
        caseops.decode(bad)


# ---------------------------------------------------------------- shards and the byte sidecar

WORDS = ("the of and river mountain city garden music science water light stone market nasa usa iphone "
         "openai mcdonald école naïve café 東京 3.14 2024 #tag α-β").split()


def cased(word: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.2:
        return word.title()
    if r < 0.27:
        return word.upper()
    if r < 0.3:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in word)
    return word


def case_corpus(n_docs: int, seed: int) -> list[str]:
    """Documents of mixed case. A few carry what the normalizer changes or drops (runs of spaces, whitespace at
    either end, a ligature) or the operator characters themselves."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sents = [" ".join(cased(rng.choice(WORDS), rng) for _ in range(rng.randint(4, 14))) + "."
                 for _ in range(rng.randint(2, 6))]
        doc = " ".join(sents)
        if i % 9 == 4:
            doc = f"  {doc}  with  gaps ﬁne\n"
        if i % 11 == 5:
            doc += f" a{TITLE}literal{ESC}"
        docs.append(doc)
    return docs


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def caseops_built(tmp_path_factory):
    """build_shards.py --caseops through its command line: a 400-piece tokenizer with the operators reserved,
    trained on the transformed training documents, and shards with the sidecar."""
    d = tmp_path_factory.mktemp("caseops")
    train, val = case_corpus(300, 1), case_corpus(40, 2)
    args = ["--input", str(write_docs(d / "train.jsonl", train)), "--val-input", str(write_docs(d / "val.jsonl", val)),
            "--tokenizer", str(d / "tok.model"), "--train-tokenizer", "400", "--caseops", "--output", str(d / "out"),
            "--shard-tokens", "2500", "--no-progress"]
    assert bs.main(args) == 0
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    return dict(dir=d, out=d / "out", sp=sp, train=train, val=val)


def split_documents(tokens: np.ndarray) -> list[tuple[int, int]]:
    starts = np.flatnonzero(tokens == bs.BOS_ID)
    return list(zip(starts, np.append(starts[1:], tokens.size)))


def same_charges(a: np.ndarray, b: np.ndarray, ids, sp) -> bool:
    """Equal per token, but that a character of several byte-fallback pieces may be charged to its last piece
    (the sidecar) or 1 byte per piece (the LUTs): the running totals agree after every other piece."""
    whole = np.array([not sp.is_byte(int(t)) for t in ids], dtype=bool)
    return a.sum() == b.sum() and np.array_equal(np.cumsum(a)[whole], np.cumsum(b)[whole])


def acting_operators(ids: list[int], sp) -> np.ndarray:
    """Which tokens are operators that act (an ESC's next piece is text), read off the token stream."""
    op_ids = {sp.piece_to_id(op): op for op in caseops.OPERATORS}
    acting, escaped = np.zeros(len(ids), dtype=bool), False
    for i, t in enumerate(ids):
        acting[i] = t in op_ids and not escaped
        escaped = acting[i] and op_ids[t] == ESC
    return acting


def test_caseops_tokenizer_reserves_the_operators(caseops_built):
    sp = caseops_built["sp"]
    assert [sp.piece_to_id(op) for op in caseops.OPERATORS] == [4, 5, 6, 7]
    assert all(sp.encode(op) == [sp.piece_to_id(op)] for op in caseops.OPERATORS)


def test_sidecar_charges_each_document_its_original_bytes(caseops_built):
    out, sp, val = caseops_built["out"], caseops_built["sp"], caseops_built["val"]
    tok_files, side_files = bs.split_paths(out, "val"), bs.split_paths(out, bs.SIDECAR_SPLIT)
    assert len(tok_files) == len(side_files) > 1  # several shards, each sidecar aligned with its token shard
    assert [bs.shard_length(f) for f in tok_files] == [bs.shard_length(f) for f in side_files]
    tokens = np.concatenate([bs.read_shard(f) for f in tok_files])
    charged = np.concatenate([bs.read_shard(f) for f in side_files]).astype(np.int64)
    docs = split_documents(tokens)
    assert len(docs) == len(val) and (tokens == bs.BOS_ID).sum() == len(val)
    assert charged.sum() == sum(len(d.encode("utf-8")) for d in val)
    assert not charged[tokens == bs.BOS_ID].any()
    n_ops = lossless = 0
    luts = tg.build_sentencepiece_luts(sp, sp.vocab_size(), "cpu")
    lut = tg.token_bytes(torch.from_numpy(tokens.astype(np.int64)), luts).numpy()
    for k, (s, e) in enumerate(docs):
        ids = tokens[s + 1:e].tolist()
        assert ids == sp.encode(caseops.encode(val[k]))
        assert charged[s:e].sum() == len(val[k].encode("utf-8")), k
        acting = acting_operators(ids, sp)
        assert not charged[s + 1:e][acting].any()
        n_ops += acting.sum()
        if sp.decode(ids) == caseops.encode(val[k]):  # the normalizer kept everything: decoding is exact
            assert caseops.decode(sp.decode(ids)) == val[k]
            # the tokenizer's own pieces, with 0 for the operators that act, are the sidecar token by token
            assert same_charges(charged[s + 1:e], np.where(acting, 0, lut[s + 1:e]), ids, sp), k
            lossless += 1
    assert n_ops > 100 and 25 < lossless < len(val)


def test_train_shards_hold_the_transformed_documents(caseops_built):
    out, sp, train = caseops_built["out"], caseops_built["sp"], caseops_built["train"]
    tokens = np.concatenate([bs.read_shard(f) for f in bs.split_paths(out, "train")])
    docs = split_documents(tokens)
    assert len(docs) == len(train)
    assert all(tokens[s + 1:e].tolist() == sp.encode(caseops.encode(t)) for (s, e), t in zip(docs, train))
    manifest = json.loads((out / "manifest.json").read_text())
    val_tokens = sum(bs.shard_length(f) for f in bs.split_paths(out, "val"))
    assert manifest["byte_sidecar"] == {"shards": len(bs.split_paths(out, "val")), "tokens": val_tokens,
                                        "bytes": sum(len(d.encode("utf-8")) for d in caseops_built["val"])}


def test_caseops_needs_a_tokenizer_with_the_operators(caseops_built, tiny_tokenizer, tmp_path, capsys):
    args = ["--input", str(caseops_built["dir"] / "train.jsonl"), "--tokenizer", str(tiny_tokenizer),
            "--caseops", "--val-docs", "5", "--output", str(tmp_path / "o"), "--no-progress"]
    assert bs.main(args) == 1
    assert "U+E001, U+E002, U+E003, U+E004 are not" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.bin"))


def test_a_plain_build_removes_an_earlier_sidecar(caseops_built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(caseops_built["out"], out)
    bs.build([caseops_built["dir"] / "train.jsonl"], caseops_built["dir"] / "tok.model", out, val_docs=5,
             progress=False, workers=1)
    assert not bs.split_paths(out, bs.SIDECAR_SPLIT) and "byte_sidecar" not in json.loads(
        (out / "manifest.json").read_text())


# ---------------------------------------------------------------- train_gpt.py charges the sidecar

@pytest.fixture(scope="module")
def plain_with_sidecar(tiny_tokenizer, tmp_path_factory):
    """The tiny tokenizer's shards of documents its normalizer keeps whole, built with a byte sidecar
    (--byte-sidecar), and the same shards without one."""
    d = tmp_path_factory.mktemp("plain")
    write_docs(d / "docs.jsonl", make_text(120, 11))
    bs.build([d / "docs.jsonl"], tiny_tokenizer, d / "side", val_docs=30, progress=False, workers=1, sidecar=True)
    shutil.copytree(d / "side", d / "luts", ignore=shutil.ignore_patterns("fineweb_val_bytes_*", "manifest.json"))
    return d


def load(tokenizer, data, monkeypatch, tmp_path, **over):
    monkeypatch.chdir(tmp_path)
    h = tg.Hyperparameters(tiny_env(tokenizer, data, **over))
    ctx = tg.Context(h)
    tg.check_manifest(h, ctx)  # as the script does first
    tokens, nbytes = tg.load_validation(h, ctx, tg.load_tokenizer(h.TOKENIZER_PATH, h.VOCAB_SIZE))
    return h, tokens, nbytes, (tmp_path / "logs" / f"{h.RUN_ID}.txt").read_text()


def test_an_identity_sidecar_gives_the_luts_bpb_bit_for_bit(tiny_tokenizer, plain_with_sidecar, monkeypatch,
                                                            tmp_path):
    h, tokens, side, log = load(tiny_tokenizer, plain_with_sidecar / "side", monkeypatch, tmp_path)
    _, tokens2, lut, log2 = load(tiny_tokenizer, plain_with_sidecar / "luts", monkeypatch, tmp_path, RUN_ID="l")
    assert torch.equal(tokens, tokens2) and side.dtype == lut.dtype == torch.int32
    assert same_charges(side.numpy(), lut.numpy(), tokens.tolist(), tg.load_tokenizer(str(tiny_tokenizer), 320))
    assert re.search(rf"^val_bpb:byte_sidecar:enabled files:1 bytes:{int(side[1:].sum())}$", log, re.M)
    assert re.search(rf"^val_bpb:byte_luts bytes:{int(lut[1:].sum())}$", log2, re.M)
    model = random_model(h)
    for fn in (tg.eval_val, tg.eval_val_sliding):
        assert fn(model, tokens, h, FakeCtx(), side) == fn(model, tokens, h, FakeCtx(), lut)


def lora_hparams():
    return hparams(NUM_LAYERS=3, TTT_MODE="lora", TTT_CHUNK_SIZE=8, TTT_EVAL_SEQ_LEN=32, TTT_BATCH_SIZE=3,
                   TTT_LORA_RANK=4, TTT_LORA_ALPHA=8, PHASED_TTT_NUM_PHASES=1, PHASED_TTT_PREFIX_DOCS=4,
                   GLOBAL_TTT_CHUNK_TOKENS=64, GLOBAL_TTT_BATCH_SEQS=4, EVAL_BATCH_SEQS=4)


@pytest.mark.parametrize("path", ["roundtrip", "sliding", "chunk", "lora"])
def test_every_evaluation_path_charges_the_given_bytes(sp, meters, path):
    """Random charges (as a CaseOps sidecar's differ from any LUT): each path's byte sum is exactly theirs."""
    h = lora_hparams()
    toks, _ = doc_stream(sp, 12, seed=4)
    n = (toks.numel() - 1) // 32 * 32
    toks = toks[:n + 1]
    charged = torch.from_numpy(np.random.default_rng(0).integers(0, 9, n + 1).astype(np.int32))
    charged[toks == tg.BOS_ID] = 0
    model = random_model(h)
    model.looping = True
    run = {"roundtrip": lambda: tg.eval_val(model, toks, h, FakeCtx(), charged),
           "sliding": lambda: tg.eval_val_sliding(model, toks, h, FakeCtx(), charged),
           "chunk": lambda: tg.eval_val_ttt(model, model, toks, h, FakeCtx(), charged, time.perf_counter()),
           "lora": lambda: tg.eval_val_ttt_lora(model, model, toks, h, FakeCtx(), charged)}
    vl, vb = run[path]()[:2]
    assert meters[-1].sums[1].item() == n and meters[-1].sums[2].item() == charged[1:].sum().item()
    assert vb == pytest.approx(vl * n / (np.log(2) * charged[1:].sum().item()), rel=1e-12)


@pytest.mark.parametrize("damage, needle", [
    ("truncate", r"has \d+ values for the \d+ tokens"),
    ("rename", "do not pair with the validation shards"),
    ("shift", "charges bytes to BOS: misaligned"),
    ("delete", "lists a byte sidecar, but no fineweb_val_bytes_"),
])
def test_a_bad_sidecar_is_an_error(tiny_tokenizer, plain_with_sidecar, monkeypatch, tmp_path, damage, needle):
    d = shutil.copytree(plain_with_sidecar / "side", tmp_path / "data")
    side = d / "fineweb_val_bytes_000000.bin"
    values = bs.read_shard(side)
    if damage == "truncate":
        write_shard(side, values[:-1])
    elif damage == "rename":
        side.rename(d / "fineweb_val_bytes_000001.bin")
    elif damage == "shift":
        write_shard(side, np.roll(values, 1))
    else:
        side.unlink()
    with pytest.raises(ValueError, match=needle):
        load(tiny_tokenizer, d, monkeypatch, tmp_path)


def test_a_caseops_tokenizer_without_sidecar_is_an_error(caseops_built, monkeypatch, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(caseops_built["out"], d, ignore=shutil.ignore_patterns("fineweb_val_bytes_*", "manifest.json"))
    with pytest.raises(ValueError, match="is a CaseOps tokenizer, but DATA_PATH=.* has no byte sidecar"):
        load(caseops_built["dir"] / "tok.model", d, monkeypatch, tmp_path, VOCAB_SIZE=400)


def test_a_caseops_run_charges_the_original_bytes(caseops_built, tmp_path):
    """The script end to end on CaseOps shards: it scores every path on the sidecar's bytes."""
    env = tiny_env(caseops_built["dir"] / "tok.model", caseops_built["out"], VOCAB_SIZE=400, ITERATIONS=4,
                   WARMDOWN_ITERS=2, BIGRAM_VOCAB_SIZE=0, VE_LAYERS="")
    r = run_script(tmp_path, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "logs" / "tiny.txt").read_text()
    tokens = np.concatenate([bs.read_shard(f) for f in bs.split_paths(caseops_built["out"], "val")])
    charged = np.concatenate([bs.read_shard(f) for f in bs.split_paths(caseops_built["out"], bs.SIDECAR_SPLIT)])
    cut = tg.validation_cut(tokens.size, 32)
    assert re.search(rf"^val_bpb:byte_sidecar:enabled files:\d+ bytes:{int(charged[1:cut].sum())}$", log, re.M)
    for name in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"):
        assert re.search(rf"^{name} val_loss:[\d.]+ val_bpb:[\d.]+", log, re.M), name


def test_caseops_presets_name_the_downloaders_paths():
    """pr1855 and later read the CaseOps export where `cached_challenge_fineweb.py --variant sp8192_caseops`
    puts it; sp8192 is the same model on the plain SP8192 data."""
    import cached_challenge_fineweb as dl
    rel = dl.dataset_dir("sp8192_caseops")
    for name in ("pr1855", "pr1945", "pr1953", "pr2014", "pr2135"):
        h = tg.Hyperparameters({"PRESET": name})
        assert h.DATA_PATH == f"./data/{rel}" and h.VOCAB_SIZE == 8192
        assert h.TOKENIZER_PATH == "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    assert tg.Hyperparameters({"PRESET": "sp8192"}).DATA_PATH == "./data/datasets/fineweb10B_sp8192"
    assert unicodedata.category(TITLE) == "Co" and tuple(tg.CASEOPS_OPERATORS) == caseops.OPERATORS
