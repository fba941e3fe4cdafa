"""SP8192 / SP4096 end to end on CPU (issue 14): build_shards trains the tokenizer with the official
settings on a synthetic corpus made here, writes the shards under the default name, and train_gpt's
byte LUTs count exactly the UTF-8 bytes of every validation document's decoded text.

The corpus is random but deterministic: Zipf-distributed pseudo-words (so BPE finds thousands of merges),
digits, punctuation, accented Latin, ß, CJK, emoji and other multi-byte characters rare enough that
some of them are left to byte-fallback pieces.
"""
from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(REPO))
import build_shards as bs  # noqa: E402
import train_gpt as tg  # noqa: E402

VAL_DOCS = 150
RARE = list("中文字符测试数据模型训练语言東京大学") + ["😀", "🚀", "👍🏽", "∑", "→", "«", "»", "—", "…", "Ω", "ß", "ﬁ", "①", "Ａ"]
# Validation-only documents for the edges of the byte rule: leading/inner/trailing whitespace, newlines,
# tabs, NUL, a literal '▁', text that NFKC changes, characters never seen in training, a lone space.
EDGE_DOCS = ["  leading spaces and   inner runs  ", "line one\nline two\n\n\tTabbed\r\nCRLF end\n",
             "▁literal lower block ▁ and ▁▁", "▁", "ﬁne ligature, full-width ＡＢＣ１２３, ① ㍿ Å",
             "never seen: 龘 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜 ǅ", "nul\x00inside", " ", "x", "12345678901234567890 3.14159",
             "e\u0301 combining, \u200b zero width, \u00a0nbsp"]


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    cons, vows, accents = "bcdfghjklmnprstvwz", "aeiou", "éèàüößçñ"

    def word() -> str:
        r = rng.random()
        if r < 0.8:
            w = "".join(rng.choice(cons) + rng.choice(vows) + (rng.choice(cons) if rng.random() < 0.4 else "")
                        for _ in range(rng.randint(1, 4)))
            if rng.random() < 0.1:
                w = w.replace(rng.choice(vows), rng.choice(accents), 1)
            return w.capitalize() if rng.random() < 0.15 else w
        if r < 0.87:
            return str(rng.randint(0, 10 ** rng.randint(1, 6)))
        if r < 0.93:
            return "".join(rng.choices(RARE, k=rng.randint(1, 3)))
        return rng.choice("([\"'#@$%&") + rng.choice(cons) * 2
    vocab = sorted({word() for _ in range(30000)})  # sorted: set order depends on the hash seed
    cum = list(itertools.accumulate(1 / (i + 10) for i in range(len(vocab))))
    docs = []
    for _ in range(n_docs):
        sents = [" ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(4, 25))) + rng.choice(".!?;:,")
                 for _ in range(rng.randint(1, 6))]
        docs.append(("\n" if rng.random() < 0.3 else " ").join(sents))
    return docs


@pytest.fixture(scope="module", params=[8192, 4096])
def built(request, tmp_path_factory) -> dict:
    """build_shards' CLI: --train-tokenizer VOCAB, then shards under the default output name."""
    vocab = request.param
    root = tmp_path_factory.mktemp(f"sp{vocab}")
    docs = make_corpus(3000)
    val = docs[:VAL_DOCS - len(EDGE_DOCS)] + EDGE_DOCS
    train = docs[VAL_DOCS - len(EDGE_DOCS):]
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in val + train:
            f.write(json.dumps({"text": d}) + "\n")
    model = root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bs, "DATA_DIR", root / "data")  # the default output goes under DATA_DIR/datasets
        rc = bs.main(["--input", str(root / "corpus.jsonl"), "--tokenizer", str(model), "--train-tokenizer",
                      str(vocab), "--val-docs", str(VAL_DOCS), "--workers", "2", "--no-progress"])
    assert rc == 0
    out = root / "data" / "datasets" / f"fineweb10B_sp{vocab}_sample"
    return {"vocab": vocab, "out": out, "model": model, "val": val, "train": train,
            "sp": spm.SentencePieceProcessor(model_file=str(model))}


def read_split(out: Path, split: str) -> np.ndarray:
    return np.concatenate([bs.read_shard(p) for p in sorted(out.glob(f"fineweb_{split}_*.bin"))])


def test_tokenizer_and_default_output(built):
    sp, vocab, out = built["sp"], built["vocab"], built["out"]
    assert sp.vocab_size() == vocab and (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert built["model"].with_suffix(".vocab").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                     "manifest.json"]
    val = read_split(out, "val")
    assert (val == 1).sum() == VAL_DOCS and (read_split(out, "train") == 1).sum() == len(built["train"])
    assert int(val.max()) < vocab and int(read_split(out, "train").max()) >= vocab - 64  # late merges are used
    used_bytes = {int(t) for t in val if sp.is_byte(int(t))}
    assert len(used_bytes) >= 8  # byte fallback really happens (rare CJK/emoji, unseen characters)
    assert 3 not in val  # never <unk>


def test_luts_count_exactly_the_decoded_bytes_of_every_document(built):
    """(prev, target) pairs over the validation stream, as the evaluation scores them: per document,
    the LUT bytes of its targets equal the UTF-8 length of its decoded text, as integers."""
    sp, vocab = built["sp"], built["vocab"]
    tokens = read_split(built["out"], "val").astype(np.int64)
    luts = tg.build_sentencepiece_luts(sp, vocab, torch.device("cpu"))
    prev, tgt = torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:])
    per_target = tg.target_bytes(prev, tgt, luts)
    assert per_target.dtype == torch.float64 and torch.equal(per_target, per_target.round())
    per_target = per_target.long().numpy()
    assert not per_target[tokens[1:] == 1].any()  # a BOS target (next document) counts 0 bytes
    starts = np.flatnonzero(tokens == 1)
    assert starts[0] == 0 and len(starts) == VAL_DOCS
    ends = np.append(starts[1:], tokens.size)
    total = 0
    for k, (s, e) in enumerate(zip(starts, ends)):
        ids = tokens[s + 1:e].tolist()
        assert ids == sp.encode(built["val"][k])
        expected = len(sp.decode(ids).encode("utf-8"))
        got = int(per_target[s:e - 1].sum())  # the targets tokens[s+1 .. e-1] sit at indices s .. e-2
        assert got == expected, (k, built["val"][k], sp.decode(ids))
        total += expected
    meter = tg.BpbMeter(torch.device("cpu"))  # the evaluation's own accumulator agrees
    meter.add(torch.zeros(tgt.numel()), tg.target_bytes(prev, tgt, luts), torch.ones(tgt.numel(), dtype=torch.bool))
    assert meter.sums[2].item() == total and meter.sums[1].item() == tokens.size - 1
