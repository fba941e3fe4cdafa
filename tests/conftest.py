"""Shared fixtures: a tiny tokenizer and tiny shards made here (no download, no ../shared), and a tiny
configuration of train_gpt.py that trains in seconds on CPU."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is was for on that with as by at from his her it an are were which be this had "
         "river mountain city garden winter summer music science history water light stone market "
         "école naïve café 東京 3.14 2024 #tag α-β").split()


def make_text(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sents.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sents))
    return docs


def write_shard(path: Path, tokens) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("tok")
    (d / "text.txt").write_text("\n".join(make_text(400, 0)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "text.txt"), model_prefix=str(d / "tiny"), model_type="bpe", vocab_size=320,
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.9995, minloglevel=2)
    return d / "tiny.model"


@pytest.fixture(scope="session")
def tiny_data(tiny_tokenizer, tmp_path_factory):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    d = tmp_path_factory.mktemp("data")
    def stream(docs):
        out = []
        for doc in docs:
            out += [1] + sp.encode(doc)
        return out
    train = stream(make_text(600, 1))
    half = len(train) // 2
    write_shard(d / "fineweb_train_000000.bin", train[:half])
    write_shard(d / "fineweb_train_000001.bin", train[half:])
    write_shard(d / "fineweb_val_000000.bin", stream(make_text(40, 2)))
    return d


@pytest.fixture(scope="session")
def sp(tiny_tokenizer):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))


@pytest.fixture(scope="session")
def luts(sp):
    """The tiny tokenizer's byte LUTs on CPU."""
    import train_gpt as tg
    return tg.build_sentencepiece_luts(sp, 320, torch.device("cpu"))


def tiny_env(tokenizer, data, **over) -> dict:
    env = dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE="320", NUM_LAYERS="3", MODEL_DIM="32",
               NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", ROPE_DIMS="4", XSA_LAST_N="2", BIGRAM_VOCAB_SIZE="64",
               BIGRAM_DIM="16", VE_DIM="8", VE_LAYERS="1,2", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", EVAL_STRIDE="8",
               TRAIN_BATCH_TOKENS="1024", ITERATIONS="12", WARMUP_STEPS="2", WARMDOWN_ITERS="6",
               MAX_WALLCLOCK_SECONDS="0", GPTQ_RESERVE_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="4",
               MATRIX_LR="0.02", SCALAR_LR="0.02", TIED_EMBED_LR="0.05", SWA_EVERY="2", SWA_START_LR="0.6",
               GPTQ_CALIB_BATCHES="2", EVAL_BATCH_SEQS="16", TTT_CHUNK_TOKENS="256", TTT_EPOCHS="1",
               TTT_BATCH_SEQS="4", TTT_LR="0.01", EMA_DECAY="0.9", RUN_ID="tiny", SEED="7")
    env.update({k: str(v) for k, v in over.items()})
    return env


# The frontier components on the tiny model: 5 layers, layers 1-2 looped twice more, lanes from layer 3.
FRONTIER = dict(NUM_LAYERS=5, VE_LAYERS="3,4", NUM_LOOPS=2, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=3,
                SMEAR_GATE="bos", SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5, SKIP_GATES_ENABLED=1,
                MUON_ROW_NORMALIZE=1, MUON_POLAR_EXPRESS=1)


def count_params_from_shapes(h) -> int:
    """The model's parameter count computed from the architecture's shapes (a cross-check of tg.GPT)."""
    d, n, kvd, hid, gate = h.MODEL_DIM, h.NUM_LAYERS, h.NUM_KV_HEADS * h.head_dim, h.mlp_hidden, 12
    total = h.VOCAB_SIZE * d + 2 * n * d * d + 2 * n * kvd * d + 2 * n * hid * d
    total += n * (4 * d + h.NUM_HEADS) + h.n_skips * d * (2 if h.SKIP_GATES_ENABLED else 1)
    total += {"static": d, "bos": gate + 1, "off": 0}[h.SMEAR_GATE]
    total += n * h.NUM_HEADS * gate if h.SPARSE_ATTN_GATE_ENABLED else 0
    total += (n - h.PARALLEL_START_LAYER) * 6 if h.PARALLEL_START_LAYER else 0
    if h.BIGRAM_VOCAB_SIZE:
        total += h.BIGRAM_VOCAB_SIZE * h.BIGRAM_DIM + h.BIGRAM_DIM * d + 1
    if h.ve_layers:
        total += h.VOCAB_SIZE * h.VE_DIM + h.VE_DIM * kvd + 1 + len(h.ve_layers)
    return total


def tiny_hparams(**over):
    """The tiny configuration as Hyperparameters, for tests that build models without files."""
    import train_gpt as tg
    return tg.Hyperparameters(tiny_env("unused.model", "unused", **over))


def doc_stream(sp, n_docs: int, seed: int):
    """BOS-separated documents as one val stream, and each document's token ids."""
    docs = [sp.encode(t) for t in make_text(n_docs, seed)]
    return torch.tensor([tok for d in docs for tok in [1] + d], dtype=torch.int64), docs


def stream(sp, n_targets: int, seed: int = 3) -> torch.Tensor:
    """A val stream of exactly n_targets targets (n_targets + 1 tokens) of tiny text."""
    toks, _ = doc_stream(sp, 4 + n_targets // 20, seed)
    assert toks.numel() > n_targets
    return toks[:n_targets + 1]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(tmp_path, env: dict, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = str(ROOT / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def meters(monkeypatch):
    """Every BpbMeter the evaluation creates, to read its exact float64 sums (nll, count, bytes)."""
    import train_gpt as tg
    made = []

    class Recording(tg.BpbMeter):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(tg, "BpbMeter", Recording)
    return made


def evaluate_on_ranks(d, env: dict, ranks=(1, 2)) -> dict:
    """One artifact (random weights, RTN) evaluated with EVAL_ARTIFACT + DUMP_TOKEN_NLL by each number of gloo
    ranks: {nproc: (log after the logged source, NLL dump, order dump)}."""
    import train_gpt as tg
    h = tg.Hyperparameters(env)
    art = d / "model.ptz"
    tg.write_atomic(str(art), tg.pack(tg.quantize_state(random_model(h), {}, h, FakeCtx()), tg.model_config(h), {})[0])
    out = {}
    for nproc in ranks:
        run = d / f"np{nproc}"
        run.mkdir()
        e = dict(env, EVAL_ARTIFACT=str(art), DUMP_TOKEN_NLL=str(run / "nll.npy"), RUN_ID=f"np{nproc}")
        r = run_script(run, e, nproc=nproc, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        log = (run / "logs" / f"np{nproc}.txt").read_text().split("=" * 100)[-1]
        out[nproc] = (log, np.load(run / "nll.npy"), np.load(run / "nll.order.npy"))
    return out


class FakeCtx:
    """Single-process stand-in for train_gpt.Context (world/rank settable) that keeps the log in a list."""
    device, cuda, grad_accum, act_dtype, compile = torch.device("cpu"), False, 8, torch.float32, False

    def __init__(self, world: int = 1, rank: int = 0, master: bool = False):
        self.world, self.rank, self.master, self.logs = world, rank, master, []

    def log(self, msg: str = "", console: bool = True):
        self.logs.append(msg)

    def sync(self):
        pass

    def barrier(self):
        pass

    def any(self, flag):
        return flag

    def max_across(self, value):
        return value

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def random_model(h, seed: int = 0, noise: float = 0.1):
    """A GPT whose weights look trained: no all-zero banks, so every prediction depends on its context."""
    import train_gpt as tg
    torch.manual_seed(seed)
    m = tg.GPT(h)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(noise * torch.randn_like(p))
    return m.eval()


def metric(log: str, name: str) -> tuple[float, float]:
    """(val_loss, val_bpb) of the first `name val_loss:… val_bpb:…` line of a log."""
    import re
    m = re.search(rf"^{name} val_loss:([\d.]+) val_bpb:([\d.]+)", log, re.M)
    assert m, f"no {name} line in log"
    return float(m.group(1)), float(m.group(2))


class HostSyncs:
    """Counts what would make the host wait for the GPU on CUDA, on any device: reading a tensor's value
    (item, bool, float, tolist) and ops whose output size depends on data (nonzero, boolean-mask indexing).
    `bump()` counts an explicit synchronize. Use as a context manager."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        aten = torch.ops.aten
        value_ops = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                     aten.is_nonzero.default, aten.equal.default}
        index_ops = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in value_ops or (func in index_ops and any(
                        i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()

    def bump(self):
        self.count += 1

    def __enter__(self):
        self._tolist = real = torch.Tensor.tolist

        def tolist(t):
            self.count += 1
            return real(t)

        torch.Tensor.tolist = tolist
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on 2 cores (compiles with inductor); part of the CI run")
