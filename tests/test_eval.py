"""Evaluation: exact sliding-window coverage, full-context equality, score-first TTT legality, byte counting,
the eval budget guard, and 1-rank == 2-rank results through the script."""
import copy
import re
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import FakeCtx as Ctx, doc_stream, evaluate_on_ranks, metric, random_model, stream, tiny_env
from conftest import tiny_hparams as hparams


# ---------------------------------------------------------------- window geometry

CASES = [(n, w, s) for w, s in ((32, 8), (32, 5), (32, 32), (16, 3), (8, 1)) for n in (1, w - 1, w, w + 1, 3 * w, 1001)]


@pytest.mark.parametrize("n, window, stride", CASES)
def test_sliding_windows_score_every_target_exactly_once(n, window, stride):
    """Each target in [0, n) is scored once; windows are full length, score inside themselves, the first from 0,
    later ones exactly their last `stride` targets, except a final tail window ending at n."""
    wins = tg.sliding_windows(n, window, stride)
    wlen = min(window, n)
    hits = np.zeros(n, dtype=int)
    for k, (start, lo, hi) in enumerate(wins):
        assert 0 <= start and start + wlen <= n, (k, start)
        assert start <= lo < hi <= start + wlen, (k, start, lo, hi)
        hits[lo:hi] += 1
        if k == 0:
            assert start == lo == 0 and hi == wlen
        elif k < len(wins) - 1 or (n - window) % stride == 0:
            assert hi == start + window and hi - lo == stride and start == wins[k - 1][0] + stride, k
        else:  # the tail window: ends at the stream's end, scores what the previous one left
            assert start == n - window and hi == n and lo == wins[k - 1][2] and hi - lo < stride
    assert (hits == 1).all(), np.flatnonzero(hits != 1)[:10]
    for world in (1, 2, 3):
        parts = np.array_split(wins, world)
        assert np.array_equal(np.concatenate(parts), wins)
        hits = np.zeros(n, dtype=int)
        for part in parts:
            for _, lo, hi in part:
                hits[lo:hi] += 1
        assert (hits == 1).all()


@pytest.mark.parametrize("world", [1, 2])
def test_eval_val_sliding_counts_every_target_once(sp, luts, meters, world):
    """eval_val_sliding over 1 or 2 ranks (array_split of windows) counts n targets and fills every nll_out slot."""
    h = hparams(EVAL_BATCH_SEQS=5)
    model, toks = random_model(h), stream(sp, 301)
    n = toks.numel() - 1
    nll = torch.zeros(n)
    for rank in range(world):
        dump = tg.TokenDump(n, "cpu")
        tg.eval_val_sliding(model, toks, h, Ctx(world, rank), tg.token_bytes(toks, luts), dump)
        part = dump.nll
        assert not ((part != 0) & (nll != 0)).any()  # no target scored by two ranks
        nll += part
    count = sum(m.sums[1].item() for m in meters)
    assert len(meters) == world and count == n
    assert (nll > 0).all(), torch.nonzero(nll == 0)[:10]
    assert sum(m.sums[0].item() for m in meters) == pytest.approx(nll.double().sum().item(), rel=1e-6)


# ---------------------------------------------------------------- sliding == direct computation

@pytest.mark.parametrize("n", [1, 20, 32])
def test_short_stream_nlls_equal_one_full_context_pass(sp, luts, n):
    """When the whole stream fits in one window, per-target sliding NLLs equal model(x, y) on the full prefix."""
    h = hparams(EVAL_SEQ_LEN=32, EVAL_STRIDE=8)
    model, toks = random_model(h), stream(sp, n)
    dump = tg.TokenDump(n, "cpu")
    tg.eval_val_sliding(model, toks, h, Ctx(), tg.token_bytes(toks, luts), dump)
    nll = dump.nll
    with torch.no_grad():
        direct = model(toks[None, :-1], toks[None, 1:])[0]
    torch.testing.assert_close(nll, direct, rtol=1e-6, atol=1e-6)


def test_long_stream_nlls_equal_direct_window_computation(sp, luts):
    """Targets of the first window (whole prefix in context) equal a full-prefix pass; every other target equals
    the model run directly on its own window."""
    h = hparams(EVAL_SEQ_LEN=32, EVAL_STRIDE=8, EVAL_BATCH_SEQS=4)
    model, toks = random_model(h), stream(sp, 203)
    n, W = toks.numel() - 1, h.EVAL_SEQ_LEN
    dump = tg.TokenDump(n, "cpu")
    tg.eval_val_sliding(model, toks, h, Ctx(), tg.token_bytes(toks, luts), dump)
    nll = dump.nll
    with torch.no_grad():
        full = model(toks[None, :-1], toks[None, 1:])[0]
        torch.testing.assert_close(nll[:W], full[:W], rtol=1e-5, atol=1e-5)
        for start, lo, hi in tg.sliding_windows(n, W, h.EVAL_STRIDE):
            x = toks[start:start + W]
            y = toks[start + 1:start + W + 1]
            direct = model(x[None], y[None])[0, lo - start:hi - start]
            torch.testing.assert_close(nll[lo:hi], direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(nll[W:], full[W:], atol=1e-3)  # sanity: the context limit matters for this model


# ---------------------------------------------------------------- legality: no peeking at the future

def ttt_hparams(**over):
    # Chunks of 60 targets, TTT sequences of 32: several chunks, each adapted on before the next is scored.
    # 60 is not a multiple of the stride 8, so some windows' scored ranges straddle a chunk boundary.
    return hparams(**{"EVAL_SEQ_LEN": 32, "EVAL_STRIDE": 8, "TTT_CHUNK_TOKENS": 60, "TTT_EPOCHS": 2, "TTT_LR": 0.05,
                      "TTT_BATCH_SEQS": 2, "EVAL_BATCH_SEQS": 8, **over})


def per_target_nll(mode, model, toks, h, luts, ctx=None):
    dump = tg.TokenDump(toks.numel() - 1, "cpu")
    model = copy.deepcopy(model)
    ctx = ctx or Ctx()
    if mode == "sliding":
        tg.eval_val_sliding(model, toks, h, ctx, tg.token_bytes(toks, luts), dump)
    else:
        tg.eval_val_ttt(model, model, toks, h, ctx, tg.token_bytes(toks, luts), time.perf_counter(), dump)
    return dump.nll


@pytest.mark.parametrize("mode", ["sliding", "ttt"])
@pytest.mark.parametrize("p", [40, 58, 121, 178])  # inside window 0; in straddling windows; after a boundary
def test_changing_future_tokens_never_changes_earlier_scores(sp, luts, mode, p):
    """Rewriting every token from position p on leaves the NLL of every target before p-1 unchanged.
    Target j is the prediction of token j+1 from tokens <= j, so target p-1 (whose answer is token p) and
    later ones may change; targets 0..p-2 saw only tokens 0..p-1, also through the TTT weights used to score them."""
    h = ttt_hparams()
    model, a = random_model(h), stream(sp, 300)
    b = a.clone()
    g = torch.Generator().manual_seed(p)
    b[p:] = (a[p:] + torch.randint(1, h.VOCAB_SIZE, (a.numel() - p,), generator=g)) % h.VOCAB_SIZE  # all differ
    na, nb = per_target_nll(mode, model, a, h, luts), per_target_nll(mode, model, b, h, luts)
    torch.testing.assert_close(na[:p - 1], nb[:p - 1], rtol=0, atol=1e-6)
    assert na[p - 1] != nb[p - 1]
    assert (na[p:] - nb[p:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [60, 64])
def test_ttt_trains_only_on_targets_already_scored(sp, monkeypatch, chunk):
    """Event order of score-first TTT: no target is trained on before it is scored, and none is scored after
    being trained on. Token ids equal positions here, so labels seen by the model identify targets (TTT
    padding carries label -100, which cross-entropy ignores); no input token of a TTT step lies past its chunk."""
    h = ttt_hparams(TTT_CHUNK_TOKENS=chunk)
    n = 300
    toks = torch.arange(n + 1, dtype=torch.int64)  # target j has label j + 1
    model = random_model(h)
    events = []

    def model_fn(x, y):
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            labels = y[y != -100]
            assert x.max() < labels.max() and torch.equal(x[y != -100], labels - 1)
            events.append(("train", set((labels - 1).tolist())))
        return model(x, y)

    class Spy(tg.BpbMeter):
        def add(self, nll, nbytes, mask):
            events.append(("score", set((nbytes[mask] - 1).tolist())))
            super().add(nll, nbytes, mask)

    monkeypatch.setattr(tg, "BpbMeter", Spy)
    # each target charged its token id (= its position): the spy reads the scored targets off the charges
    tg.eval_val_ttt(model, model_fn, toks, h, Ctx(), toks.clone(), time.perf_counter())
    scored, trained = set(), set()
    for kind, targets in events:
        if kind == "score":
            assert not targets & trained, sorted(targets & trained)[:5]
            assert not targets & scored
            scored |= targets
        else:
            assert targets <= scored, sorted(targets - scored)[:5]
            trained |= targets
    assert scored == set(range(n))
    assert trained == set(range(chunk * ((n - 1) // chunk)))  # every chunk but the last is trained on


def test_ttt_adapts_and_first_chunk_is_scored_unadapted(sp, luts):
    """TTT really changes later scores (so the legality test is not vacuous) but chunk 0 equals plain sliding."""
    h = ttt_hparams()
    model, toks = random_model(h), stream(sp, 300)
    slide, ttt = per_target_nll("sliding", model, toks, h, luts), per_target_nll("ttt", model, toks, h, luts)
    C = h.TTT_CHUNK_TOKENS
    torch.testing.assert_close(ttt[:C], slide[:C], rtol=1e-6, atol=1e-6)
    assert (ttt[C:] - slide[C:]).abs().max() > 1e-3
    assert ttt[C:].mean() < slide[C:].mean()  # adapting on the stream itself helps on this text


def test_frozen_blocks_do_not_change_during_ttt(sp, luts):
    """TTT_FREEZE_BLOCKS=1: layer 0's bank slices and block parameters are untouched, later layers adapt."""
    h = ttt_hparams(TTT_FREEZE_BLOCKS=1)
    model, toks = random_model(h), stream(sp, 200)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tg.eval_val_ttt(model, model, toks, h, Ctx(), tg.token_bytes(toks, luts), time.perf_counter())
    after, n = model.state_dict(), h.NUM_LAYERS
    for bank, frozen in (("qo_bank", [0, n]), ("kv_bank", [0, n]), ("mlp_up_bank", [0]), ("mlp_down_bank", [0])):
        for j in range(after[bank].size(0)):
            same = torch.equal(after[bank][j], before[bank][j])
            assert same == (j in frozen), (bank, j)
    for k in before:
        if k.startswith("blocks.0."):
            assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["blocks.1.attn_scale"], before["blocks.1.attn_scale"])
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- bytes

def test_counted_bytes_equal_utf8_bytes_of_the_decoded_documents(sp, luts, meters):
    """Sliding and TTT meters count exactly the UTF-8 bytes of each decoded document (BOS targets count 0)."""
    _, docs = doc_stream(sp, 8, seed=11)
    for i in range(1, len(docs), 2):  # half the documents start with a '▁' piece: after BOS its space is not text
        k = next(k for k, t in enumerate(docs[i]) if sp.id_to_piece(t).startswith("\u2581"))
        docs[i] = docs[i][k:]
    toks = torch.tensor([t for d in docs for t in [1] + d], dtype=torch.int64)
    want = sum(len(sp.decode(d).encode("utf-8")) for d in docs)
    assert want > sum(len(d) for d in docs)  # multi-byte characters and byte-fallback pieces are present
    h = ttt_hparams(TTT_EPOCHS=1, TTT_CHUNK_TOKENS=256)
    model = random_model(h)
    tg.eval_val_sliding(model, toks, h, Ctx(), tg.token_bytes(toks, luts))
    tg.eval_val_ttt(copy.deepcopy(model), model, toks, h, Ctx(), tg.token_bytes(toks, luts), time.perf_counter())
    assert len(meters) == 2
    for m in meters:
        assert m.sums[1].item() == toks.numel() - 1
        assert m.sums[2].item() == want


# ---------------------------------------------------------------- eval budget guard

@pytest.mark.parametrize("how", ["tiny budget", "started long ago"])
def test_budget_guard_stops_adaptation_but_scores_everything(sp, luts, meters, how):
    """Over budget, TTT logs ttt:budget_stop, trains nothing, still counts every target, and its result equals
    plain sliding evaluation of the same model."""
    h = ttt_hparams(EVAL_BUDGET_SECONDS=1e-6 if how == "tiny budget" else 600)
    t_eval0 = time.perf_counter() - (0 if how == "tiny budget" else 10_000)
    model, toks = random_model(h), stream(sp, 300)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx, dump = Ctx(), tg.TokenDump(toks.numel() - 1, "cpu")
    vl, vb = tg.eval_val_ttt(model, model, toks, h, ctx, tg.token_bytes(toks, luts), t_eval0, dump)
    nll = dump.nll
    assert any(m.startswith("ttt:budget_stop chunk:1/") for m in ctx.logs), ctx.logs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert meters[0].sums[1].item() == toks.numel() - 1 and (nll > 0).all()
    ref = tg.TokenDump(nll.numel(), "cpu")
    svl, svb = tg.eval_val_sliding(model, toks, h, Ctx(), tg.token_bytes(toks, luts), ref)
    ref = ref.nll
    torch.testing.assert_close(nll, ref, rtol=1e-6, atol=1e-6)
    assert vl == pytest.approx(svl, rel=1e-7) and vb == pytest.approx(svb, rel=1e-7)


# ---------------------------------------------------------------- through the script: 1 rank == 2 ranks


@pytest.fixture(scope="module")
def rank_runs(tiny_tokenizer, tiny_data, tmp_path_factory):
    """One artifact (random weights, RTN) evaluated with EVAL_ARTIFACT + DUMP_TOKEN_NLL by 1 and by 2 gloo ranks.
    TTT chunks of 100 targets hold 4 sequences of 32 (the last one short), in TTT batches of 3: splits over
    2 ranks are uneven and some batches leave rank 1 with no sequence. The val stream has 6624 targets, so the
    last chunk is partial too."""
    env = tiny_env(tiny_tokenizer, tiny_data, TTT_CHUNK_TOKENS=100, TTT_BATCH_SEQS=3, TTT_EPOCHS=1, TTT_LR=0.02)
    return evaluate_on_ranks(tmp_path_factory.mktemp("ranks"), env)


def test_two_ranks_match_one_rank(rank_runs):
    """Roundtrip, sliding and legal TTT results with 2 gloo ranks equal the 1-rank results."""
    (log1, *_), (log2, *_) = rank_runs[1], rank_runs[2]
    assert "ttt:budget_stop" not in log1 + log2
    assert re.search(r"^ttt_sliding:start chunks=67 chunk_tokens=100 ", log2, re.M)
    for name, rel in (("final_int6_roundtrip", 1e-7), ("final_int6_sliding_window", 1e-7), ("legal_ttt", 1e-5)):
        (l1, b1), (l2, b2) = metric(log1, name + "_exact"), metric(log2, name + "_exact")
        assert l2 == pytest.approx(l1, rel=rel) and b2 == pytest.approx(b1, rel=rel), name
    assert metric(log1, "legal_ttt_exact") != metric(log1, "final_int6_sliding_window_exact")  # TTT did something


def test_two_rank_token_nll_dump_equals_one_rank(rank_runs):
    """DUMP_TOKEN_NLL with EVAL_ARTIFACT on 2 ranks: one float32 entry per target, all > 0, equal to 1 rank's;
    the order dump holds the TTT chunk (of 67, of 100 targets) that scored each target, the same on both."""
    (log1, a, order1), (_, b, order2) = rank_runs[1], rank_runs[2]
    n = int(re.search(r"^val_loader:shards .* tokens:(\d+)", log1, re.M).group(1))
    assert a.shape == b.shape == (n,) and a.dtype == b.dtype == np.float32
    want = np.zeros(n, dtype=np.int64)
    for _, lo, hi in tg.sliding_windows(n, 32, 8):  # a window is scored with the chunk its scored range starts in
        want[lo:hi] = min(lo // 100, 66)
    assert np.array_equal(order1, want) and np.array_equal(order1, order2)
    assert (a > 0).all() and (b > 0).all()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    loss, _ = metric(log1, "legal_ttt_exact")
    assert a.astype(np.float64).mean() == pytest.approx(loss, rel=1e-6)  # the dump is what legal_ttt scored
