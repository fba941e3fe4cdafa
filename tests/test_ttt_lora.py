"""TTT_MODE=lora: per-document LoRA test-time training with phased global SGD (the frontier's evaluation).
Legality in scoring order (no score depends on a token scored later), every target scored once, the plain
model where nothing adapts, the pauses' data, zero adapters as the identity at every site, a warm-up that never
reads validation tokens, the budget guard, and 2 ranks == 1 rank through the script."""
import copy
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import FRONTIER, FakeCtx, doc_stream, evaluate_on_ranks, metric, random_model, tiny_env
from conftest import tiny_hparams as hparams

# Small lora settings: chunks of 8 targets, contexts of 32, 3 documents per batch, rank-4 adapters whose LR
# visibly changes later scores; 2 pauses, after the batches holding documents 3 and 6 of the scoring order.
LORA = dict(FRONTIER, TTT_MODE="lora", TTT_CHUNK_SIZE=8, TTT_EVAL_SEQ_LEN=32, TTT_BATCH_SIZE=3, TTT_LORA_RANK=4,
            TTT_LORA_ALPHA=8, TTT_LORA_LR=0.02, PHASED_TTT_NUM_PHASES=2, PHASED_TTT_PREFIX_DOCS=6,
            GLOBAL_TTT_LR=0.02, GLOBAL_TTT_CHUNK_TOKENS=64, GLOBAL_TTT_BATCH_SEQS=4)
OFF = dict(PHASED_TTT_NUM_PHASES=0, TTT_WARM_START_A=0)  # every document independent of every other
# Tokens after each document's BOS: longer than the context (slides), chunk multiples, an empty document
# (BOS BOS: one target), the last one (its targets end with the stream: 26, no BOS to predict), and ties:
# 13 targets twice in one batch, 26 twice across batches 1 and 2 (stream order decides which goes first).
DOC_LENGTHS = (56, 9, 33, 0, 40, 12, 31, 5, 12, 47, 2, 25, 26)


class Ctx(FakeCtx):
    """FakeCtx that also keeps log lines in a shared event list (to order them against other events)."""

    def __init__(self, world: int = 1, rank: int = 0, events: list | None = None):
        super().__init__(world, rank)
        self.events = events

    def log(self, msg: str = "", console: bool = True):
        super().log(msg, console)
        if self.events is not None:
            self.events.append(("log", msg))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is several times faster than two fighting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lora_h(**over):
    return hparams(**{**LORA, **over})


@pytest.fixture(scope="module")
def corpus(sp):
    """The val stream and each document's (first target, targets), built here (not by find_docs)."""
    _, texts = doc_stream(sp, len(DOC_LENGTHS), seed=5)
    toks, docs = [], []
    for text, k in zip(texts, DOC_LENGTHS):
        assert len(text) >= k
        docs.append((len(toks), k + 1))
        toks += [1] + text[:k]
    docs[-1] = (docs[-1][0], DOC_LENGTHS[-1])  # the last document has no BOS to predict
    toks = torch.tensor(toks, dtype=torch.int64)
    assert sum(n for _, n in docs) == toks.numel() - 1
    return toks, docs


@pytest.fixture(scope="module")
def base_model():
    model = random_model(lora_h())
    model.looping = True  # as load_eval_model sets it for NUM_LOOPS > 0
    return model


class Result:
    def __init__(self, vl, vb, dump, logs, model):
        self.vl, self.vb, self.nll, self.order, self.logs, self.model = vl, vb, dump.nll, dump.order, logs, model


@pytest.fixture(scope="module")
def lora_run(base_model, luts):
    """lora_run(tokens, **settings) -> Result of one rank's pass on a copy of the base model; cached."""
    @lru_cache(maxsize=None)
    def cached(toks: tuple, over: tuple):
        model, h, ctx = copy.deepcopy(base_model), lora_h(**dict(over)), Ctx()
        with_caps(model, h)
        val = torch.tensor(toks, dtype=torch.int64)
        dump = tg.TokenDump(val.numel() - 1, "cpu")
        vl, vb, _ = tg.eval_val_ttt_lora(model, model, val, h, ctx, tg.token_bytes(val, luts), dump)
        return Result(vl, vb, dump, ctx.logs, model)

    def run(toks: torch.Tensor, **over):
        return cached(tuple(toks.tolist()), tuple(sorted(over.items())))
    return run


def with_caps(model, h):
    """As load_eval_model: ASYM_LOGIT_RESCALE adds both caps, at LOGIT_SOFTCAP, to the evaluated model."""
    if h.ASYM_LOGIT_RESCALE:
        model.logit_caps = torch.nn.Parameter(torch.full((2,), h.LOGIT_SOFTCAP))
    return model


def plan_of(toks, **over):
    h = lora_h(**over)
    return tg.DocPlan(tg.find_docs(toks), h, tg.lora_row_lengths(h))


def spec_order(docs, R: int, C: int, n_targets: int) -> np.ndarray:
    """Each target's scoring step as the semantics define it: documents longest first (stable) in batches of R,
    a batch takes as many steps as its longest document has chunks of C, target i of a document is in chunk i//C."""
    order, step = np.full(n_targets, -1, dtype=np.int64), 0
    ranked = sorted(range(len(docs)), key=lambda i: -docs[i][1])  # sorted() is stable
    for b in range(0, len(ranked), R):
        batch = [docs[i] for i in ranked[b:b + R]]
        for start, n in batch:
            order[start:start + n] = step + np.arange(n) // C
        step += -(-max(n for _, n in batch) // C)
    return order


def rewrite(toks: torch.Tensor, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """toks with every token at `positions` replaced by another non-BOS id (BOS positions must not be given)."""
    assert (toks[positions] != tg.BOS_ID).all()
    g = torch.Generator().manual_seed(seed)
    new = torch.randint(2, 320, (positions.numel(),), generator=g)
    new = torch.where(new == toks[positions], 2 + (new - 1) % 318, new)  # 2..319, never the old id
    out = toks.clone()
    out[positions] = new
    assert (out[positions] != toks[positions]).all() and (out[positions] != tg.BOS_ID).all()
    return out


# ---------------------------------------------------------------- one instrumented run (phases, warm-start A)

class Watched(torch.Tensor):
    """Validation tokens that record every use but metadata (numel, device, ...) into `Watched.events`."""
    events: list = []
    META = [torch.Tensor.numel, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.__len__,
            torch.Tensor.device.__get__, torch.Tensor.dtype.__get__, torch.Tensor.shape.__get__]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in cls.META:
            cls.events.append(("read", getattr(func, "__name__", str(func))))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class HitDump(tg.TokenDump):
    """A TokenDump that also counts how often each target is scored, and keeps the set scored so far."""

    def __init__(self, n: int):
        super().__init__(n, "cpu")
        self.hits, self.scored = torch.zeros(n, dtype=torch.int64), set()

    def add(self, idx, mask, nll, step):
        super().add(idx, mask, nll, step)
        self.hits.index_put_((idx[mask],), torch.ones_like(idx[mask]), accumulate=True)
        self.scored |= set(idx[mask].tolist())


@pytest.fixture(scope="module")
def traced(corpus, base_model, luts):
    """The base settings (2 pauses, warm-start A on) run once with spies: every scored target (TokenDump),
    every meter, each pause's documents and training pieces, the model around the warm-up, and each read of
    the validation tokens, all in one event list with the log lines."""
    toks, _ = corpus
    events, made, pauses = [], [], []
    model, h = copy.deepcopy(base_model), lora_h()
    n = toks.numel() - 1

    class Meter(tg.BpbMeter):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    dump = HitDump(n)
    real_pause, real_warmup, real_piece_rows = tg.LoraTTT.pause, tg.LoraTTT.warmup, tg.piece_rows

    def pause(self, docs):
        rec = dict(docs={tuple(d) for d in docs.tolist()}, n_docs=len(docs), scored=set(dump.scored), pieces=[])
        pauses.append(rec)
        tg.piece_rows = lambda val, pieces, rows, L: rec["pieces"].extend(pieces.tolist()) or real_piece_rows(
            val, pieces, rows, L)
        try:
            real_pause(self, docs)
        finally:
            tg.piece_rows = real_piece_rows

    warm = {}

    def warmup(self, pauses):
        warm["before"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        real_warmup(self, pauses)
        warm["after"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        warm["grads"] = [p.grad for p in self.model.parameters()]

    val = toks.clone().as_subclass(Watched)
    Watched.events = events
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "BpbMeter", Meter)
        mp.setattr(tg.LoraTTT, "pause", pause)
        mp.setattr(tg.LoraTTT, "warmup", warmup)
        ctx = Ctx(events=events)
        vl, vb, ttt_s = tg.eval_val_ttt_lora(model, model, val, h, ctx, tg.token_bytes(toks, luts), dump)
    Watched.events = []
    return dict(events=events, meters=made, pauses=pauses, dump=dump, warm=warm, logs=ctx.logs, vl=vl,
                model=model, ttt_s=ttt_s)


def test_every_target_scored_exactly_once_in_the_specified_order(corpus, traced, luts):
    """One meter counts every target once with its bytes (those of the whole stream); the dump has one NLL > 0
    per target, the mean of which is val_loss; each target's scoring step is the spec's (longest first, stable,
    batch steps = its longest document's chunks)."""
    toks, docs = corpus
    n, dump = toks.numel() - 1, traced["dump"]
    assert len(traced["meters"]) == 1
    loss, count, nbytes = traced["meters"][0].sums.tolist()
    assert count == n
    assert nbytes == tg.target_bytes(toks[:-1], toks[1:], luts).sum().item() > 0
    assert (dump.hits == 1).all(), torch.nonzero(dump.hits != 1)[:10]
    assert (dump.nll > 0).all()
    assert loss == pytest.approx(dump.nll.double().sum().item(), rel=1e-6)
    assert traced["vl"] == pytest.approx(loss / n, rel=1e-12)
    want = spec_order(docs, 3, 8, n)
    assert np.array_equal(dump.order.numpy(), want)


def test_pauses_train_on_exactly_the_documents_already_scored(corpus, traced):
    """Each pause gets all documents whose targets are scored at that moment and no other; it trains (SGD on
    the base weights) on their targets only, each once per epoch; the pauses come after the batches holding
    documents PHASED_TTT_PREFIX_DOCS * p / PHASES (3 and 6 of the order, so after batches 0 and 1)."""
    toks, docs = corpus
    pauses = traced["pauses"]
    assert [p["n_docs"] for p in pauses] == [3, 6]
    for p in pauses:
        targets = {t for s, n in p["docs"] for t in range(s, s + n)}
        assert len(p["docs"]) == p["n_docs"] and p["docs"] <= set(docs)
        assert targets == p["scored"]  # all scored documents, only scored documents
        trained = Counter(t for s, n in p["pieces"] for t in range(s, s + n))
        assert set(trained) == targets and set(trained.values()) == {1}  # GLOBAL_TTT_EPOCHS=1
        for s, n in p["pieces"]:  # no training row crosses a document boundary or exceeds the context
            assert 0 < n <= 32 and any(ds <= s and s + n <= ds + dn for ds, dn in p["docs"])
    assert pauses[0]["docs"] < pauses[1]["docs"]
    logs = traced["logs"]
    assert sum(m.startswith("ttpp: phase:") for m in logs) == 2
    changed = [k for k, v in traced["warm"]["after"].items() if not torch.equal(v, traced["model"].state_dict()[k])]
    assert changed  # the pauses trained the base model


def test_warmup_reads_no_validation_token_and_changes_nothing(traced):
    """No use of the validation tensor before `beginning TTT eval timer` is logged (the warm-up runs on random
    tokens), many after; the warm-up leaves every weight bit-identical and no gradient behind."""
    events = traced["events"]
    start = events.index(("log", "beginning TTT eval timer"))
    before = [e for e in events[:start] if e[0] == "read"]
    after = [e for e in events[start:] if e[0] == "read"]
    assert not before, before[:5]
    assert len(after) > 10
    warm = traced["warm"]
    assert warm["before"].keys() == warm["after"].keys()
    for k, v in warm["before"].items():
        assert torch.equal(v, warm["after"][k]), k
    assert all(g is None for g in warm["grads"])


# ---------------------------------------------------------------- legality

@pytest.mark.parametrize("where", ["inside batch 0", "first step after pause 1", "first step of a warm-start batch"])
def test_rewriting_tokens_scored_after_step_s_keeps_every_earlier_score(corpus, traced, lora_run, where):
    """With pauses and warm-start A on: rewrite every token whose own target (the one predicting it) is scored
    after step s (BOS stays BOS, so documents keep their lengths and order). Every target scored at a step
    <= s keeps its NLL; later ones change, also where their answer is unchanged (BOS answers: context/adapters)."""
    toks, docs = corpus
    plan = plan_of(toks)
    assert plan.ends == [1, 2] and plan.n_batches == 5
    s = {"inside batch 0": 3, "first step after pause 1": int(plan.first_step[1]),
         "first step of a warm-start batch": int(plan.first_step[3])}[where]  # batch 3: 2nd of its phase
    order = traced["dump"].order
    j = torch.arange(1, toks.numel())
    positions = j[(order[j - 1] > s) & (toks[j] != tg.BOS_ID)]
    b = rewrite(toks, positions, seed=s)
    base, new = traced["dump"].nll, lora_run(b)
    assert torch.equal(new.order, order)
    early = order <= s
    assert early.sum() > 0 and (~early).sum() > 0
    torch.testing.assert_close(new.nll[early], base[early], rtol=0, atol=1e-6)
    same_answer = ~early & (b[1:] == toks[1:])
    assert same_answer.any()
    assert (new.nll[same_answer] - base[same_answer]).abs().max() > 1e-4


@pytest.mark.parametrize("t", [19, 37])  # inside chunk 2 (within the context); in chunk 4 (sliding)
def test_changing_a_document_after_position_t_keeps_its_scores_up_to_t(corpus, traced, lora_run, t):
    """In the longest document (first batch): tokens after position t rewritten. Its targets 0..t-1 (answers at
    positions <= t) keep their scores, target t and later ones change; the other documents of its batch (own
    adapters) are untouched; later batches see it through the pause and the warm-started A."""
    toks, docs = corpus
    s, n = docs[0]
    assert n == 57
    b = rewrite(toks, torch.arange(s + t + 1, s + n), seed=t)
    base, new = traced["dump"].nll, lora_run(b).nll
    torch.testing.assert_close(new[s:s + t], base[s:s + t], rtol=0, atol=1e-6)
    assert (new[s + t] - base[s + t]).abs() > 1e-4
    assert (new[s + t + 1:s + n] - base[s + t + 1:s + n]).abs().max() > 1e-4
    first_batch = traced["dump"].order < int(plan_of(toks).first_step[1])
    others = torch.ones_like(first_batch)
    others[s:s + n] = False
    torch.testing.assert_close(new[first_batch & others], base[first_batch & others], rtol=0, atol=1e-6)
    assert (new[~first_batch] - base[~first_batch]).abs().max() > 1e-4


@pytest.mark.parametrize("k", [9, 12])  # the middle row of batch 0; the stream's last document (batch 2)
def test_documents_are_independent_without_pauses_and_warm_start(corpus, lora_run, base_model, k):
    """Phases and warm-start A off: rewriting one document (same length, no BOS) changes its own scores and no
    other document's; the base weights are untouched (only adapters train)."""
    toks, docs = corpus
    s, n = docs[k]
    positions = torch.arange(s + 1, s + 1 + DOC_LENGTHS[k])  # its tokens after the BOS
    b = rewrite(toks, positions, seed=k)
    base, new = lora_run(toks, **OFF), lora_run(b, **OFF)
    mine = torch.zeros(toks.numel() - 1, dtype=torch.bool)
    mine[s:s + n] = True
    torch.testing.assert_close(new.nll[~mine], base.nll[~mine], rtol=0, atol=1e-6)
    assert (new.nll[mine] - base.nll[mine]).abs().max() > 1e-3
    for name, v in base_model.state_dict().items():
        assert torch.equal(base.model.state_dict()[name], v), name


def test_adaptation_changes_later_chunks_only(corpus, lora_run):
    """No pauses, no warm start: with TTT_LORA_LR > 0 each document's chunk 0 is scored as with LR 0 (B starts
    at 0), later chunks differ; the adapted model predicts its documents' later chunks better."""
    toks, docs = corpus
    ttt, plain = lora_run(toks, **OFF), lora_run(toks, PHASED_TTT_NUM_PHASES=0, TTT_LORA_LR=0.0)
    first = torch.zeros(toks.numel() - 1, dtype=torch.bool)
    for s, n in docs:
        first[s:s + min(n, 8)] = True
    torch.testing.assert_close(ttt.nll[first], plain.nll[first], rtol=0, atol=1e-6)
    assert (ttt.nll[~first] - plain.nll[~first]).abs().max() > 1e-2
    assert ttt.nll[~first].mean() < plain.nll[~first].mean()


# ---------------------------------------------------------------- nothing adapts: the plain model

def test_lr_zero_without_pauses_is_the_plain_model_on_each_document(corpus, lora_run, base_model):
    """TTT_LORA_LR=0, no pauses: a document that fits the context scores as model(x, y) on it alone; a longer
    one's chunk scores as the model on the TTT_EVAL_SEQ_LEN tokens ending at the chunk's end."""
    toks, docs = corpus
    nll = lora_run(toks, PHASED_TTT_NUM_PHASES=0, TTT_LORA_LR=0.0).nll
    n_long = 0
    with torch.no_grad():
        for s, n in docs:
            if n <= 32:
                direct = base_model(toks[None, s:s + n], toks[None, s + 1:s + n + 1])[0]
                torch.testing.assert_close(nll[s:s + n], direct, rtol=0, atol=1e-5)
                continue
            n_long += 1
            for c in range(-(-n // 8)):
                end = min((c + 1) * 8, n)
                ws = max(end - 32, 0)
                direct = base_model(toks[None, s + ws:s + end], toks[None, s + ws + 1:s + end + 1])[0]
                torch.testing.assert_close(nll[s + c * 8:s + end], direct[c * 8 - ws:], rtol=0, atol=1e-5)
    assert n_long >= 3


def test_pause_placement_changes_scores_from_the_next_batch_on(corpus, lora_run, base_model):
    """TTT_LORA_LR=0: a run with pauses scores every target before the first pause as a run without; the
    batch right after pause 1 (after the batch holding document PREFIX_DOCS/2 = 3: batch (3-1)//3 = 0) differs;
    the pauses train the base weights."""
    toks, _ = corpus
    paused, plain = lora_run(toks, TTT_LORA_LR=0.0), lora_run(toks, TTT_LORA_LR=0.0, PHASED_TTT_NUM_PHASES=0)
    first_after = (3 - 1) // 3 + 1
    plan = plan_of(toks)
    before = paused.order < int(plan.first_step[first_after])
    after_one = ~before & (paused.order < int(plan.first_step[first_after + 1]))
    torch.testing.assert_close(paused.nll[before], plain.nll[before], rtol=0, atol=1e-6)
    assert (paused.nll[after_one] - plain.nll[after_one]).abs().max() > 1e-4
    assert any(m.startswith("ttt_phased:") and "boundaries:[3, 6]" in m for m in paused.logs)
    trained = paused.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in base_model.state_dict().items())


def test_budget_stop_scores_everything_with_the_plain_model(corpus, lora_run, base_model, luts, meters):
    """EVAL_BUDGET_SECONDS tiny: ttt:budget_stop at batch 1, no pause, the weights unchanged, every target
    scored once, and the scores those of TTT_LORA_LR=0 without pauses."""
    toks, _ = corpus
    h, ctx, model = lora_h(EVAL_BUDGET_SECONDS=1e-6), Ctx(), copy.deepcopy(base_model)
    dump = tg.TokenDump(toks.numel() - 1, "cpu")
    vl, vb, _ = tg.eval_val_ttt_lora(model, model, toks, h, ctx, tg.token_bytes(toks, luts), dump)
    assert any(m.startswith("ttt:budget_stop batch:1/5 ") for m in ctx.logs), ctx.logs
    assert not any(m.startswith("ttpp:") for m in ctx.logs)
    for k, v in base_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert meters[0].sums[1].item() == toks.numel() - 1 and (dump.nll > 0).all()
    ref = lora_run(toks, PHASED_TTT_NUM_PHASES=0, TTT_LORA_LR=0.0)
    torch.testing.assert_close(dump.nll, ref.nll, rtol=0, atol=1e-6)
    assert vl == pytest.approx(ref.vl, rel=1e-7) and vb == pytest.approx(ref.vb, rel=1e-7)


# ---------------------------------------------------------------- adapters in the model's own forward

CONFIGS = {
    "frontier looped": (FRONTIER, True),  # loops, lanes, BOS smear, sparse attention gate, skip gates, VE, bigram
    "frontier unlooped": (FRONTIER, False),
    "static smear, VE, bigram, XSA": ({}, False),
    "loop + lanes, no smear/bigram/VE/XSA": (dict(NUM_LOOPS=1, LOOP_START=0, LOOP_END=1, PARALLEL_START_LAYER=2,
                                                  SMEAR_GATE="off", BIGRAM_VOCAB_SIZE=0, VE_LAYERS="",
                                                  XSA_LAST_N=0), True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_adapters_are_the_plain_forward_and_every_site_is_wired(name):
    """Freshly reset adapters (random A, B = 0) give exactly model(ids, y). A nonzero B in row 0 at any one
    site (q, k, v, o, mlp of each position in the layer order, or the head) changes row 0's output and leaves
    row 1's bit-identical (one document per row)."""
    over, looping = CONFIGS[name]
    h = hparams(**over, TTT_LORA_RANK=4, TTT_LORA_ALPHA=8)
    model = random_model(h, seed=1)
    model.looping = looping
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(2, 320, (2, 16), generator=g), torch.randint(0, 320, (2, 16), generator=g)
    ids[:, 0], ids[0, 7] = tg.BOS_ID, tg.BOS_ID
    lora = tg.Adapters(model, h, 2)
    lora.reset(False, seed=3)
    assert len(lora.layers) == len(model.order())
    assert all(set(ad) == set(tg.LORA_SITES) for ad in lora.layers)
    with torch.no_grad():
        plain = model(ids, y)
        assert torch.equal(model(ids, y, lora=lora), plain)
        sites = [(f"layer position {v} {key}", ad[key]) for v, ad in enumerate(lora.layers) for key in ad]
        for what, m in sites + [("head", lora.head)]:
            m.B[0].normal_(generator=g)
            out = model(ids, y, lora=lora)
            m.B.zero_()
            assert (out[0] - plain[0]).abs().max() > 1e-6, what
            assert torch.equal(out[1], plain[1]), what
        assert torch.equal(model(ids, y, lora=lora), plain)


def test_lora_site_switches_choose_the_adapters():
    h = hparams(TTT_K_LORA=0, TTT_MLP_LORA=0, TTT_LORA_RANK=4)
    lora = tg.Adapters(tg.GPT(h), h, 3)
    assert all(set(ad) == {"q", "v", "o"} for ad in lora.layers)
    assert lora.head.A.shape == (3, 4, h.MODEL_DIM) and lora.head.B.shape == (3, h.VOCAB_SIZE, 4)


# ---------------------------------------------------------------- through the script: 1 rank == 2 ranks

@pytest.fixture(scope="module")
def lora_rank_runs(tiny_tokenizer, tiny_data, tmp_path_factory):
    """One artifact (random weights, RTN) evaluated in lora mode by 1 and 2 gloo ranks, warm-start A off, 2
    pauses. The tiny val stream's 40 documents in batches of 6 make 7 batches: uneven over 2 ranks, and the
    first two (each before a pause) leave rank 1 idle. The tiny 3-layer model keeps it fast: the frontier
    components' adapters are checked in-process above. Learned caps on (from 2, where they move), no V adapter."""
    env = tiny_env(tiny_tokenizer, tiny_data, TTT_MODE="lora", TTT_WARM_START_A=0, ASYM_LOGIT_RESCALE=1,
                   LOGIT_SOFTCAP=2.0, TTT_V_LORA=0,
                   PHASED_TTT_NUM_PHASES=2, PHASED_TTT_PREFIX_DOCS=8, SLIDING_WINDOW_ENABLED=0, TTT_BATCH_SIZE=6,
                   TTT_CHUNK_SIZE=64, TTT_EVAL_SEQ_LEN=256, TTT_LORA_RANK=4, TTT_LORA_ALPHA=8, TTT_LORA_LR=0.01,
                   GLOBAL_TTT_LR=0.01, GLOBAL_TTT_CHUNK_TOKENS=256, GLOBAL_TTT_BATCH_SEQS=8)
    return evaluate_on_ranks(tmp_path_factory.mktemp("lora_ranks"), env)


def test_lora_two_ranks_match_one_rank(lora_rank_runs):
    """quantized_ttt_phased (rel 1e-5), the per-target NLLs (rtol 1e-4) and the scoring steps (identical) of
    2 ranks equal 1 rank's; both logs time the pass and pause twice."""
    (log1, nll1, order1), (log2, nll2, order2) = lora_rank_runs[1], lora_rank_runs[2]
    for log in (log1, log2):
        assert "ttt:budget_stop" not in log
        assert re.search(r"^beginning TTT eval timer$", log, re.M)
        assert re.search(r"^ttt_eval_time:[\d.]+s ", log, re.M)
        assert re.search(r"^ttt_phased: total_docs:40 prefix_docs:\d+ .* batches:7$", log, re.M)
        assert len(re.findall(r"^ttpp: phase:\d/2 ", log, re.M)) == 2
    (l1, b1), (l2, b2) = metric(log1, "quantized_ttt_phased_exact"), metric(log2, "quantized_ttt_phased_exact")
    assert l2 == pytest.approx(l1, rel=1e-5) and b2 == pytest.approx(b1, rel=1e-5)
    n = int(re.search(r"^val_loader:shards .* tokens:(\d+)", log1, re.M).group(1))
    assert nll1.shape == nll2.shape == order1.shape == (n,)
    assert (nll1 > 0).all() and (nll2 > 0).all()
    np.testing.assert_allclose(nll2, nll1, rtol=1e-4, atol=1e-5)
    assert np.array_equal(order1, order2)
    assert nll1.astype(np.float64).mean() == pytest.approx(l1, rel=1e-6)  # the dump is what was scored
    assert metric(log1, "quantized_ttt_phased_exact") != metric(log1, "final_int6_roundtrip_exact")
    caps = [[float(v) for v in re.search(r"^asym_logit_caps: pos:(\S+) neg:(\S+)$", log, re.M).groups()]
            for log in (log1, log2)]
    assert caps[1] == pytest.approx(caps[0], rel=1e-5) and caps[0] != [2.0, 2.0]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_share_each_phase_by_cost(world):
    """DocPlan.rank_batches: in each phase, every batch goes to exactly one rank, each rank's batches are in queue
    order, and the busiest rank carries at most the least loaded one's work plus one batch (greedy, longest
    first): one very long document does not make every round wait on the rank that holds it."""
    rng = np.random.default_rng(world)
    lengths = np.concatenate([[4000, 1500], rng.integers(2, 300, 200)])
    docs = np.stack([np.cumsum(lengths) - lengths, lengths], axis=1)
    h = lora_h(TTT_BATCH_SIZE=4, PHASED_TTT_PREFIX_DOCS=120, PHASED_TTT_NUM_PHASES=3)
    plan = tg.DocPlan(docs, h, tg.lora_row_lengths(h))
    assert plan.ends == [10, 20, 30] and (np.diff(plan.cost) <= 0).all()
    for lo, hi in plan.segments():
        shares = [plan.rank_batches(lo, hi, world, r) for r in range(world)]
        assert sorted(q for s in shares for q in s) == list(range(lo, hi))
        assert all(s == sorted(s) for s in shares)
        load = [plan.cost[s].sum() for s in shares]
        assert max(load) <= min(load) + plan.cost[lo:hi].max()
    if world == 2:  # batch 0 (the 4000-token document) outweighs the rest of phase 1: it runs alone
        assert plan.rank_batches(0, 10, 2, 0) == [0]


# ---------------------------------------------------------------- the later rows' settings (#1945 ... #2135)

# Every new setting at once: learned caps, short-document chunks (2 targets for documents of <= 10 tokens, 4 up
# to 30, else 8), no Q/V adapters, the local LR multiplier, and a context past TRAIN_SEQ_LEN (48 > 32, as
# #1953's 2560 > 2048): with LORA's 2 pauses.
LATER = dict(ASYM_LOGIT_RESCALE=1, TTT_SHORT_SCORE_FIRST_STEPS="10:2,30:4", TTT_Q_LORA=0, TTT_V_LORA=0,
             TTT_LOCAL_LR_MULT=0.75, TTT_EVAL_SEQ_LEN=48)


def short_chunk(n_targets: int) -> int:
    tokens = n_targets + 1  # its BOS up to the next document's
    return 2 if tokens <= 10 else 4 if tokens <= 30 else 8


def class_order(docs, R: int, n_targets: int) -> np.ndarray:
    """Each target's scoring step: documents longest first (stable), in batches of up to R documents of one chunk
    size; a batch takes as many steps as its longest document has chunks; target i is in chunk i // C."""
    ranked, batches = sorted(range(len(docs)), key=lambda i: -docs[i][1]), []
    for i in ranked:
        b = batches[-1] if batches else None
        if b is None or len(b) == R or short_chunk(docs[b[0]][1]) != short_chunk(docs[i][1]):
            batches.append(b := [])
        b.append(i)
    order, step = np.full(n_targets, -1, dtype=np.int64), 0
    for b in batches:
        C = short_chunk(docs[b[0]][1])
        for start, n in (docs[i] for i in b):
            order[start:start + n] = step + np.arange(n) // C
        step += -(-docs[b[0]][1] // C)
    return order


def test_short_documents_get_their_chunk_and_every_target_is_scored_once(corpus, base_model, luts, meters):
    """With every later setting on: each document is scored in the chunks its length selects, in batches that
    share one, in the specified order; every target exactly once, with its bytes."""
    toks, docs = corpus
    n = toks.numel() - 1
    h, model = lora_h(**LATER), copy.deepcopy(base_model)
    dump = HitDump(n)
    tg.eval_val_ttt_lora(with_caps(model, h), model, toks, h, Ctx(), tg.token_bytes(toks, luts), dump)
    assert sorted({short_chunk(k) for _, k in docs}) == [2, 4, 8]
    assert (dump.hits == 1).all() and meters[0].sums[1].item() == n
    assert meters[0].sums[2].item() == tg.target_bytes(toks[:-1], toks[1:], luts).sum().item()
    assert np.array_equal(dump.order.numpy(), class_order(docs, 3, n))
    plan = plan_of(toks, **LATER)
    assert [sorted({short_chunk(k) for _, k in plan.batch(q)}) for q in range(plan.n_batches)] == [
        [c] for c in plan.chunk.tolist()]


@pytest.mark.parametrize("frac", [0.3, 0.7])
def test_later_settings_keep_every_score_made_before_a_rewrite(corpus, lora_run, frac):
    """With every later setting on (the caps trained by the 2 pauses): rewriting each token whose target is scored
    after step s leaves every score made at or before s bit for bit, and changes later ones."""
    toks, _ = corpus
    base = lora_run(toks, **LATER)
    s = int(frac * int(base.order.max()))
    j = torch.arange(1, toks.numel())
    new = lora_run(rewrite(toks, j[(base.order[j - 1] > s) & (toks[j] != tg.BOS_ID)], seed=s), **LATER)
    early = base.order <= s
    assert torch.equal(new.order, base.order) and early.any() and (~early).any()
    torch.testing.assert_close(new.nll[early], base.nll[early], rtol=0, atol=1e-6)
    assert (new.nll[~early] - base.nll[~early]).abs().max() > 1e-4


def test_asymmetric_caps_move_only_in_the_pauses(corpus, base_model, luts, lora_run):
    """The caps start at LOGIT_SOFTCAP; no document batch (LoRA Adam) changes them, each pause (SGD on the
    base weights) does, apart. Without pauses they stay put, and every score is bit for bit that without them.
    (The caps start at 2 here: this model's logits are ~1, so at 30 one SGD step would move them by < 1 ulp.)"""
    toks, _ = corpus
    h, model, seen = lora_h(ASYM_LOGIT_RESCALE=1, LOGIT_SOFTCAP=2.0), copy.deepcopy(base_model), []
    with_caps(model, h)
    real = {name: getattr(tg.LoraTTT, name) for name in ("score_batch", "pause")}

    def spy(name):
        def call(self, *args):
            before = model.logit_caps.detach().clone()
            real[name](self, *args)
            seen.append((name, before, model.logit_caps.detach().clone()))
        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in real:
            mp.setattr(tg.LoraTTT, name, spy(name))
        tg.eval_val_ttt_lora(model, model, toks, h, Ctx(), tg.token_bytes(toks, luts))
    assert torch.equal(seen[0][1], torch.full((2,), 2.0))
    assert [n for n, _, _ in seen].count("pause") == 2 and len(seen) == 7
    for name, before, after in seen:
        assert torch.equal(before, after) == (name == "score_batch"), name
    assert model.logit_caps[0] != model.logit_caps[1]
    plain, capped = lora_run(toks, **OFF), lora_run(toks, **OFF, ASYM_LOGIT_RESCALE=1)
    assert torch.equal(capped.nll, plain.nll)
    assert torch.equal(capped.model.logit_caps, torch.full((2,), 30.0))


def test_local_lr_mult_scales_the_adapters_lr(corpus, lora_run):
    toks, _ = corpus
    half = lora_run(toks, **OFF, TTT_LORA_LR=0.02, TTT_LOCAL_LR_MULT=0.5)
    assert torch.equal(half.nll, lora_run(toks, **OFF, TTT_LORA_LR=0.01).nll)
    assert not torch.equal(half.nll, lora_run(toks, **OFF, TTT_LORA_LR=0.02).nll)


def test_asymmetric_softcap_is_the_softcap_at_init_then_caps_each_sign():
    """Both caps at LOGIT_SOFTCAP: bit for bit 30 tanh(z / 30) (the frontier model). Caps (0.5, 2): positive
    logits capped at 0.5, the others at 2, as written out here."""
    h = hparams(**FRONTIER, ASYM_LOGIT_RESCALE=1)
    model = random_model(h, seed=2)
    model.looping = True
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(2, 320, (2, 24), generator=g), torch.randint(0, 320, (2, 24), generator=g)
    with torch.no_grad():
        plain = model(ids, y)
        with_caps(model, h)
        assert torch.equal(model(ids, y), plain)
        model.logit_caps.copy_(torch.tensor([0.5, 2.0]))
        z = F.linear(model.hidden(ids), model.tok_emb.weight)
        capped = torch.where(z > 0, 0.5 * torch.tanh(z / 0.5), 2.0 * torch.tanh(z / 2.0))
        want = F.cross_entropy(capped.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        torch.testing.assert_close(model(ids, y), want, rtol=1e-6, atol=1e-6)
        assert (want - plain).abs().max() > 1e-2
