"""The SP8192 frontier settings (issue 14): presets, depth recurrence, two-lane residuals, BOS-masked SmearGate,
sparse attention gate, gated skips, MuonEq-R, Polar Express, WARMDOWN_FRAC/MIN_LR; each checked against the
records' description (../shared/docs/frontier.md) and against the identity where it should be one."""
import re
import sys

import pytest
import torch

import train_gpt as tg
from conftest import (FRONTIER, ROOT, FakeCtx, count_params_from_shapes, metric, random_model, run_script,
                      tiny_env)
from conftest import tiny_hparams as hparams

# ---------------------------------------------------------------- presets

def test_preset_sets_the_records_values_and_explicit_env_wins():
    types = {s.name: type(s.default) for s in tg.HPARAMS}
    assert all(type(v) is types[k] for p in tg.PRESETS.values() for k, v in p.items())  # as if parsed from env
    h = tg.Hyperparameters({"PRESET": "sp8192"})
    assert {k: getattr(h, k) for k in tg.PRESETS["sp8192"]} == tg.PRESETS["sp8192"]
    assert h.loop_order == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]  # #1493's 17 virtual layers
    assert h.rope_base == 10000.0 and h.n_skips == 8
    over = tg.Hyperparameters({"PRESET": "sp8192", "MUON_MOMENTUM": "0.99", "NUM_LOOPS": "0"})
    assert over.MUON_MOMENTUM == 0.99 and over.NUM_LOOPS == 0 and over.loop_order == list(range(11))
    assert over.MUON_WD == 0.095  # the rest stays the preset's
    assert tg.Hyperparameters({"RUN_ID": "a"}).items() == tg.Hyperparameters({"PRESET": "pr549", "RUN_ID": "a"}).items()
    with pytest.raises(ValueError, match="PRESET='sp1024x'"):
        tg.Hyperparameters({"PRESET": "sp1024x"})


# Each accepted record's values, from its seed logs' hyperparameter blocks (the #1945 row: commit 70067534);
# what a preset lacks is in README (Presets). #1855's first, then each row's changes.
R1855 = dict(VOCAB_SIZE=8192, NUM_LAYERS=11, MODEL_DIM=512, MLP_MULT=4.0, QK_GAIN_INIT=5.0, LOGIT_SOFTCAP=30.0,
             NUM_LOOPS=2, LOOP_START=3, LOOP_END=5, ENABLE_LOOPING_AT=0.35, PARALLEL_START_LAYER=8, XSA_LAST_N=11,
             SPARSE_ATTN_GATE_SCALE=0.5, ROPE_DIMS=16, ROPE_BASE=10000.0, MATRIX_LR=0.026, SCALAR_LR=0.02,
             TIED_EMBED_LR=0.03, MUON_MOMENTUM=0.97, MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM_WARMUP_STEPS=1500,
             MUON_WD=0.095, EMBED_WD=0.085, ADAM_WD=0.02, BETA1=0.9, BETA2=0.99, EMA_DECAY=0.9965, WARMDOWN_FRAC=0.85,
             MIN_LR=0.1, GRAD_CLIP_NORM=0.3, TRAIN_SEQ_LEN=2048, TRAIN_SEQ_SCHEDULE="", TRAIN_BATCH_TOKENS=786_432,
             GPTQ_CALIB_BATCHES=16, LQER_RANK=4, LQER_TOP_K=3, LQER_ASYM_GROUP=64, ATTN_CLIP_SIGMAS=13.0,
             MLP_CLIP_SIGMAS=11.5, EMBED_CLIP_SIGMAS=14.0, EMBED_BITS=7, MATRIX_BITS=6, AWQ_LITE_GROUP_TOP_K=0,
             SLIDING_WINDOW_ENABLED=False,
             ASYM_LOGIT_RESCALE=False, TTT_MODE="lora", TTT_EVAL_SEQ_LEN=2048, TTT_CHUNK_SIZE=48,
             TTT_SHORT_SCORE_FIRST_STEPS="", TTT_BATCH_SIZE=64, TTT_LORA_RANK=80, TTT_LORA_ALPHA=144.0,
             TTT_LORA_LR=1e-4, TTT_LOCAL_LR_MULT=1.0, TTT_BETA1=0.0, TTT_BETA2=0.99, TTT_WEIGHT_DECAY=0.5,
             TTT_WARM_START_A=True, TTT_Q_LORA=True, TTT_K_LORA=True, TTT_V_LORA=True, TTT_O_LORA=True,
             TTT_MLP_LORA=True, PHASED_TTT_NUM_PHASES=3, PHASED_TTT_PREFIX_DOCS=2500, GLOBAL_TTT_LR=1e-3,
             GLOBAL_TTT_MOMENTUM=0.9, GLOBAL_TTT_EPOCHS=1, GLOBAL_TTT_CHUNK_TOKENS=32768, GLOBAL_TTT_BATCH_SEQS=32,
             GLOBAL_TTT_GRAD_CLIP=1.0)
R1945 = {**R1855, "ASYM_LOGIT_RESCALE": True, "AWQ_LITE_GROUP_TOP_K": 1}
R1953 = {**R1945, "QK_GAIN_INIT": 5.25, "EVAL_SEQ_LEN": 2560, "TTT_EVAL_SEQ_LEN": 2560, "TTT_Q_LORA": False,
         "TTT_V_LORA": False, "TTT_LOCAL_LR_MULT": 0.75}
R2014 = {**R1953, "TRAIN_SEQ_LEN": 3072, "TRAIN_SEQ_SCHEDULE": "1024@0.1,2048@0.7,3072@1.0",
         "SEQ_CHANGE_WARMUP_STEPS": 32, "TTT_EVAL_SEQ_LEN": 3072, "TTT_SHORT_SCORE_FIRST_STEPS": "256:8,2000:24",
         "TTT_BATCH_SIZE": 24, "PHASED_TTT_NUM_PHASES": 1, "EVAL_SEQ_LEN": 2048}  # 2048: see README (Presets)
R2135 = {**R1945, "AWQ_LITE_GROUP_TOP_K": 0, "MATRIX_LR": 0.028, "GPTQ_CALIB_BATCHES": 32, "LQER_ASYM_GROUP": 32, "EVAL_SEQ_LEN": 2560,
         "TTT_EVAL_SEQ_LEN": 2560, "TTT_LORA_LR": 8e-5, "TTT_WEIGHT_DECAY": 2.0, "TTT_K_LORA": False,
         "PHASED_TTT_NUM_PHASES": 1}
RECORDS = {"pr1855": R1855, "sp8192": R1855, "pr1945": R1945, "pr1953": R1953, "pr2014": R2014, "pr2135": R2135}


@pytest.mark.parametrize("preset", list(RECORDS))
def test_each_preset_resolves_to_its_records_values(preset):
    h = tg.Hyperparameters({"PRESET": preset})
    assert {k: getattr(h, k) for k in RECORDS[preset]} == RECORDS[preset]
    assert h.rope_base == 10000.0 and sum(p.numel() for p in tg.GPT(h).parameters()) == count_params_from_shapes(h)
    assert set(tg.PRESETS) == {"pr549", "demo", *RECORDS}  # demo: tests/test_demo.py


def test_rope_past_the_training_length_keeps_the_first_positions():
    """#1953/#2014 score at 2560/3072 tokens: RoPE's tables and rotations for the first 2048 positions are the
    same bits at 2048 and at 3072 (a fixed base, no rescaling), and the eval context never changes the base."""
    r = tg.Rotary(16, tg.Hyperparameters({"PRESET": "pr2014"}).rope_base)
    (c2, s2), (c3, s3) = r.cos_sin(2048), r.cos_sin(3072)
    assert torch.equal(c3[:2048], c2) and torch.equal(s3[:2048], s2)
    x = torch.randn(1, 3072, 2, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r(x)[:, :2048], r(x[:, :2048]))
    for preset in ("pr549", "pr1855"):
        bases = {tg.Hyperparameters({"PRESET": preset, "EVAL_SEQ_LEN": str(L), "TTT_EVAL_SEQ_LEN": str(L)}).rope_base
                 for L in (2048, 2560, 3072)}
        assert len(bases) == 1, (preset, bases)


def test_sp8192_preset_builds_the_records_model():
    """PR #1855 logs 35,945,671 parameters: ours minus the 48 lane scalars it allocates for layers 0-7 and
    never uses (its lanes start at layer 8)."""
    h = tg.Hyperparameters({"PRESET": "sp8192"})
    model = tg.GPT(h)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params_from_shapes(h) == 35_945_671 - 8 * 6
    assert model.bigram is None and model.ve_shared is None and isinstance(model.smear, tg.BosSmearGate)


@pytest.mark.parametrize("env, needle", [
    ({"WARMDOWN_FRAC": "0.5"}, "WARMDOWN_FRAC"),  # with the default WARMDOWN_ITERS: ambiguous
    ({"PRESET": "sp8192", "PARALLEL_START_LAYER": "4"}, "PARALLEL_START_LAYER"),  # inside the loop
    ({"PARALLEL_START_LAYER": "3"}, "PARALLEL_START_LAYER"),  # an encoder layer
    ({"NUM_LOOPS": "1", "LOOP_END": "11"}, "LOOP_END"),
    ({"NUM_LOOPS": "1", "LOOP_START": "6", "LOOP_END": "5"}, "LOOP_END"),
    ({"ENABLE_LOOPING_AT": "1.5"}, "ENABLE_LOOPING_AT"),
    ({"SMEAR_GATE": "dynamic"}, "SMEAR_GATE"),
    ({"MIN_LR": "-0.1"}, "MIN_LR"),
    ({"LOOP_STRAT": "3"}, "LOOP_STRAT"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048"}, "TRAIN_SEQ_SCHEDULE='1024@0.5,2048': must be comma-separated pairs"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048@0.9"}, "TRAIN_SEQ_SCHEDULE.*increase to 1.0"),  # not to the end
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,4096@1.0"}, "TRAIN_SEQ_SCHEDULE.*TRAIN_SEQ_LEN"),  # ends at another length
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.7,2048@0.5,3072@1"}, "TRAIN_SEQ_SCHEDULE.*increase"),
    ({"TRAIN_SEQ_SCHEDULE": "2048@0.5,1024@1"}, "TRAIN_SEQ_SCHEDULE.*increasing"),
    ({"TTT_SHORT_SCORE_FIRST_STEPS": "256:0"}, "TTT_SHORT_SCORE_FIRST_STEPS.*> 0"),
    ({"TTT_SHORT_SCORE_FIRST_STEPS": "256:8;2000:24"}, "TTT_SHORT_SCORE_FIRST_STEPS"),
    ({"TTT_SHORT_SCORE_FIRST_STEPS": "256:4096"}, "TTT_SHORT_SCORE_FIRST_STEPS.*<= TTT_EVAL_SEQ_LEN"),
    ({"TTT_LOCAL_LR_MULT": "0"}, "TTT_LOCAL_LR_MULT"),
    ({"LQER_ASYM_GROUP": "0"}, "LQER_ASYM_GROUP"),
])
def test_bad_frontier_settings_fail_naming_the_variable(env, needle):
    with pytest.raises(ValueError, match=needle):
        tg.Hyperparameters(env)


# ---------------------------------------------------------------- the forward pass against the records' spec

def reference_hidden(model: tg.GPT, h, ids: torch.Tensor) -> torch.Tensor:
    """PR #1855's forward as its notes describe it, written out plainly: encoder = first half of the virtual
    layer order, decoder = the rest; skips LIFO by decoder position; from the first lane layer, lane 0 gets
    the skips and feeds attention (mixed with x0), lane 1 feeds the MLP; the lanes' mean is normed."""
    x = model.embed(ids)
    x0, order = x, model.order()
    enc, dec = order[:len(order) // 2], order[len(order) // 2:]
    skips = []
    for i in enc:
        x = model.blocks[i](x, x0, model.layer_weights(i), None, model.rotary, tg._no_observe)
        skips.append(x)
    lane0 = lane1 = None
    for j, i in enumerate(dec):
        b, w = model.blocks[i], model.layer_weights(i)
        lanes_on = h.PARALLEL_START_LAYER and i >= h.PARALLEL_START_LAYER
        if lanes_on and lane0 is None:
            lane0 = lane1 = x
        if skips:
            s = model.skip_weights[j] * skips.pop()
            target = lane0 if lanes_on else x
            g = torch.sigmoid(model.skip_gates[j]) if model.skip_gates is not None else None
            merged = target + s if g is None else g * target + (1 - g) * s
            lane0, x = (merged, x) if lanes_on else (lane0, merged)
        if not lanes_on:
            x = b(x, x0, w, None, model.rotary, tg._no_observe)
            continue
        mix, k = b.resid_mix, i - h.PARALLEL_START_LAYER
        a = b.attn_scale * b.attn(tg.rms_norm(mix[0] * lane0 + mix[1] * x0) * b.ln_s, *w[:4], None, model.rotary,
                                  tg._no_observe)
        m = b.mlp_scale * b.mlp(tg.rms_norm(lane1) * b.ln_s, *w[4:], tg._no_observe)
        R, P = model.lane_resid[k], model.lane_post[k]
        lane0, lane1 = R[0] * lane0 + P[0, 0] * a + P[1, 0] * m, R[1] * lane1 + P[0, 1] * a + P[1, 1] * m
    return tg.rms_norm(x if lane0 is None else (lane0 + lane1) / 2)


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("lanes, gates", [(0, 0), (3, 0), (3, 1), (4, 1)])
def test_forward_matches_the_records_spec(looping, lanes, gates):
    h = hparams(**FRONTIER | dict(PARALLEL_START_LAYER=lanes, SKIP_GATES_ENABLED=gates, VE_LAYERS=""))
    model = random_model(h, seed=1, noise=0.3)
    model.looping = looping
    ids = torch.randint(0, 320, (2, 24))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(m.layer)) for b in model.blocks]
    got = model.hidden(ids)
    for hk in hooks:
        hk.remove()
    if not lanes:  # lane layers run through Block.lanes, which forward hooks do not see
        assert seen == ([0, 1, 2, 1, 2, 1, 2, 3, 4] if looping else [0, 1, 2, 3, 4])
    torch.testing.assert_close(got, reference_hidden(model, h, ids), atol=1e-5, rtol=1e-5)


def test_loops_off_is_the_unlooped_model_and_on_changes_it():
    """NUM_LOOPS=2 before the switch computes exactly what NUM_LOOPS=0 computes with the same weights."""
    looped = random_model(hparams(**FRONTIER), seed=2)
    plain = tg.GPT(hparams(**FRONTIER | dict(NUM_LOOPS=0)))
    state = looped.state_dict()
    n = plain.skip_weights.size(0)
    state |= {"skip_weights": state["skip_weights"][:n], "skip_gates": state["skip_gates"][:n]}
    plain.load_state_dict(state)
    ids = torch.randint(0, 320, (2, 24))
    assert torch.equal(looped(ids, ids), plain(ids, ids))
    looped.looping = True
    assert not torch.allclose(looped(ids, ids), plain(ids, ids))


def test_gates_are_the_identity_or_a_half_at_init():
    """BOS SmearGate (lam = 0) is the identity; the sparse attention gate (W = 0) halves attention exactly."""
    base = dict(FRONTIER, NUM_LOOPS=0, PARALLEL_START_LAYER=0, SKIP_GATES_ENABLED=0)
    off = random_model(hparams(**base | dict(SMEAR_GATE="off", SPARSE_ATTN_GATE_ENABLED=0)), seed=3)
    gated = tg.GPT(hparams(**base))
    state = off.state_dict()
    with torch.no_grad():
        for b, g in zip(off.blocks, gated.blocks):
            g.attn_scale.copy_(b.attn_scale)
        gated.load_state_dict(state | {k: v for k, v in gated.state_dict().items() if k not in state})
        for b in off.blocks:
            b.attn_scale.mul_(0.5)
    ids = torch.randint(0, 320, (2, 24))
    torch.testing.assert_close(gated(ids, ids), off(ids, ids))


def test_sparse_gate_scales_each_head_by_its_sigmoid():
    h = hparams(**FRONTIER)
    model = random_model(h, seed=4)
    b, d = model.blocks[0], h.MODEL_DIM
    w = list(model.layer_weights(0))
    w[3] = torch.eye(d)  # W_o = I: the attention output is the gated heads themselves
    x = torch.randn(2, 10, d)
    gated = b.attn(x, *w[:4], None, model.rotary, tg._no_observe).view(2, 10, h.NUM_HEADS, h.head_dim)
    gate_w, b.attn_gate = b.attn_gate, None
    plain = b.attn(x, *w[:4], None, model.rotary, tg._no_observe).view(2, 10, h.NUM_HEADS, h.head_dim)
    g = torch.sigmoid(0.5 * x[..., :12] @ gate_w.T)
    assert gate_w.abs().sum() > 0 and g.std() > 0.01
    torch.testing.assert_close(gated, plain * g[..., None])


def _doc_nlls(smear: str, tail: list[int], seed: int = 5) -> torch.Tensor:
    """NLLs at the positions of document k+1 (from its BOS on) after document k = `tail`. Attention is
    silenced (W_o = 0), so only the per-token path and the smear gate can carry one document into the next."""
    h = hparams(**FRONTIER | dict(SMEAR_GATE=smear, BIGRAM_VOCAB_SIZE=0, NUM_LOOPS=0, PARALLEL_START_LAYER=0))
    model = random_model(h, seed=seed, noise=0.5)
    if smear == "bos":
        with torch.no_grad():
            model.smear.lam.fill_(2.0)
    with torch.no_grad():
        model.qo_bank[h.NUM_LAYERS:].zero_()
    nxt = [tg.BOS_ID, 17, 99, 250, 8, 8, 31]
    ids = torch.tensor([[tg.BOS_ID, 40, 41, 42] + tail + nxt])
    return model(ids[:, :-1], ids[:, 1:])[0, -len(nxt) + 1:]


@pytest.mark.parametrize("smear", ["bos", "static"])
def test_changing_a_document_never_changes_the_next_ones_nll_through_the_bos_smear(smear):
    a, b = _doc_nlls(smear, [5, 6, 7, 300]), _doc_nlls(smear, [200, 201, 9, 12])
    if smear == "bos":
        assert torch.equal(a, b)
    else:  # PR #549's static gate leaks the previous document's last token into the BOS prediction
        assert not torch.equal(a[0], b[0]) and torch.equal(a[1:], b[1:])


def test_every_gate_and_lane_adapts_in_ttt(tiny_tokenizer, sp, luts):
    """TTT steps the same forward: the smear, sparse attention gate, skip gates and lane routing all move."""
    h = tg.Hyperparameters(tiny_env(tiny_tokenizer, "unused", **FRONTIER, TTT_LR=0.05))
    model = random_model(h, seed=6)
    model.looping = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from conftest import stream
    toks = stream(sp, 600)
    state = tg.chunk_ttt_state(model, h, FakeCtx())
    model.train()
    tg.ttt_train_chunk(model, state, toks, 0, 256, h.TTT_LR, h, FakeCtx())
    after = model.state_dict()
    for k in ("smear.lam", "smear.gate", "blocks.0.attn_gate", "blocks.4.attn_gate", "skip_gates", "lane_resid",
              "lane_post"):
        assert not torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------- optimizer and schedule

def test_muon_eq_r_feeds_newton_schulz_unit_rows(monkeypatch):
    seen = []
    monkeypatch.setattr(tg, "zeropower_via_newtonschulz5", lambda u, steps, coeffs: seen.append(u) or u)
    g, buf = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    want = g + 0.9 * (0.9 * buf + g)  # Nesterov on the updated buffer
    tg.muon_direction(g, buf.clone(), 0.9, 5, tg.NS_QUINTIC, row_normalize=False)
    tg.muon_direction(g, buf.clone(), 0.9, 5, tg.NS_QUINTIC, row_normalize=True)
    torch.testing.assert_close(seen[0], want)
    torch.testing.assert_close(seen[1], want / want.norm(dim=-1, keepdim=True))


def test_polar_express_orthogonalizes_small_singular_values_better():
    torch.manual_seed(0)
    G = torch.randn(4, 64, 32) * torch.logspace(-3, 0, 32)  # ill-conditioned, as late-training gradients
    quintic, polar = (torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G, 5, c))
                      for c in (tg.NS_QUINTIC, tg.NS_POLAR_EXPRESS))
    assert polar.min() > 1.5 * quintic.min() and polar.max() < 1.2
    # past the 5 tuples the last one repeats (a step count above 5 stays well defined)
    six = tg.zeropower_via_newtonschulz5(G, 6, tg.NS_POLAR_EXPRESS)
    assert torch.linalg.svdvals(six).min() > polar.min()


def test_warmdown_frac_and_min_lr_floor():
    """PR #1855: 1 until the last WARMDOWN_FRAC of training, then linear, floored at MIN_LR."""
    h = hparams(WARMDOWN_ITERS=0, WARMDOWN_FRAC=0.85, MIN_LR=0.1, ITERATIONS=1000)
    budget = 600_000
    assert tg.lr_multiplier(h, 10, 0.1 * budget, budget) == 1.0
    assert tg.lr_multiplier(h, 10, 0.5 * budget, budget) == pytest.approx(0.5 / 0.85)
    assert tg.lr_multiplier(h, 10, 0.95 * budget, budget) == 0.1
    assert tg.lr_multiplier(h, 500, 0.0, 0.0) == pytest.approx(0.5 / 0.85)  # uncapped: step / ITERATIONS
    iters = hparams(WARMDOWN_ITERS=100, MIN_LR=0.2, ITERATIONS=1000)
    assert tg.lr_multiplier(iters, 950, 0.0, 0.0) == 0.5 and tg.lr_multiplier(iters, 990, 0.0, 0.0) == 0.2


def test_compile_warmup_warms_both_loop_graphs_and_is_undone(tiny_tokenizer, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = tg.Hyperparameters(tiny_env(tiny_tokenizer, tiny_data, **FRONTIER, WARMUP_STEPS=2))
    ctx = tg.Context(h)
    model = tg.build_model(h, ctx)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    orig = model.hidden
    model.hidden = lambda ids, lora=None: modes.append(model.looping) or orig(ids, lora)
    loader_fn = lambda: tg.DistributedTokenLoader(f"{h.DATA_PATH}/fineweb_train_*.bin", 0, 1, "cpu", h.VOCAB_SIZE, h.SEED)
    tg.compile_warmup(model, model, loader_fn, h, ctx)
    assert modes == [False] * 16 + [True] * 16  # 2 steps x 8 micro-batches each way
    assert model.looping is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k]), k


# ---------------------------------------------------------------- end to end

def test_frontier_preset_trains_switches_the_loop_and_evaluates(tiny_tokenizer, tiny_data, tmp_path):
    """PRESET=sp8192 on the tiny model (only shape, loop range and lane start shrunk): the loop switches on
    at 35% of the steps, val_bpb falls, and the reloaded artifact evaluates looped."""
    env = tiny_env(tiny_tokenizer, tiny_data, PRESET="sp8192", NUM_LAYERS=5, LOOP_START=1, LOOP_END=2,
                   PARALLEL_START_LAYER=3, XSA_LAST_N=5, ITERATIONS=20, VAL_LOSS_EVERY=1000, TTT_ENABLED=0, RUN_ID="frontier")
    for k in ("BIGRAM_VOCAB_SIZE", "BIGRAM_DIM", "VE_DIM", "VE_LAYERS", "WARMDOWN_ITERS", "MATRIX_LR",
              "SCALAR_LR", "TIED_EMBED_LR", "TTT_LR"):
        env.pop(k)  # the preset's values, not the tiny configuration's
    r = run_script(tmp_path, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "logs" / "frontier.txt").read_text().split("=" * 100)[-1]
    assert "hparam:PRESET=sp8192" in log and "hparam:MUON_WD=0.095" in log and "hparam:BIGRAM_VOCAB_SIZE=0" in log
    assert re.search(r"^preset:sp8192 smear_gate:bos sparse_attn_gate:True skip_gates:True parallel_start_layer:3 "
                     r"num_loops:2 looped_order:\[0, 1, 2, 1, 2, 1, 2, 3, 4\] enable_looping_at:0.35$", log, re.M)
    assert re.search(r"^layer_loop:enabled step:7 frac:0.350 ", log, re.M)  # 7 / 20 steps
    assert re.search(r"^loop_warmup_step:2/2$", log, re.M)
    vals = [float(v) for v in re.findall(r"^step:\d+/20 val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.3, vals
    post_ema = float(re.search(r"^DIAGNOSTIC post_ema val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M).group(1))
    assert abs(metric(log, "final_int6_roundtrip_exact")[1] - post_ema) < 0.01  # reloaded looped, as calibrated


def test_frontier_preset_learns_real_text(tmp_path):
    """PRESET=sp8192 with its own 8192 tokenizer trained on the real FineWeb sample shipped in data/sample:
    val_bpb on held-out real documents falls within 30 small steps."""
    sys.path.insert(0, str(ROOT / "data"))
    import build_shards
    sample = ROOT / "data" / "sample"
    assert build_shards.main(
        ["--input", str(sample / "train.jsonl"), "--val-input", str(sample / "val.jsonl"), "--val-docs", "8",
         "--no-progress", "--tokenizer", str(tmp_path / "sp8192.model"), "--train-tokenizer", "8192",
         "--output", str(tmp_path / "data")]) == 0
    env = dict(PRESET="sp8192", DATA_PATH=str(tmp_path / "data"), TOKENIZER_PATH=str(tmp_path / "sp8192.model"),
               NUM_LAYERS=5, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, XSA_LAST_N=5, LOOP_START=1, LOOP_END=2,
               PARALLEL_START_LAYER=3, TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128, EVAL_STRIDE=128, TRAIN_BATCH_TOKENS=2048,
               ITERATIONS=30, WARMUP_STEPS=1, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=1000, TTT_ENABLED=0,
               EMA_DECAY=0.9, RUN_ID="real")
    r = run_script(tmp_path, {k: str(v) for k, v in env.items()})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "logs" / "real.txt").read_text().split("=" * 100)[-1]
    vals = [float(v) for v in re.findall(r"^step:\d+/30 val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.5, vals
    assert re.search(r"^layer_loop:enabled step:11 ", log, re.M)  # ceil(0.35 * 30)


def test_reevaluating_under_a_scheduled_preset_adopts_the_artifacts_training_length(tmp_path):
    """PRESET=pr2014 (its schedule ends at 3072) re-evaluating an artifact trained at 2048 without a schedule:
    both are adopted from the artifact together, so the settings stay consistent; the log names them."""
    run = tg.Hyperparameters({"PRESET": "pr1855"})
    meta = {"eval": {k: getattr(run, k) for k in tg.EVAL_KEYS}}
    path = tmp_path / "a.ptz"
    tg.write_atomic(str(path), tg.pack({}, tg.model_config(run), meta)[0])
    h, ctx = tg.Hyperparameters({"PRESET": "pr2014"}), FakeCtx()
    tg.adopt_artifact_settings(str(path), h, ctx)
    assert h.TRAIN_SEQ_LEN == 2048 and h.seq_schedule == [(2048, 1.0)] and h.TTT_EVAL_SEQ_LEN == 2048
    assert any(re.match(r"eval_setting:from_artifact .*TRAIN_SEQ_LEN=2048 TRAIN_SEQ_SCHEDULE=$", m) for m in ctx.logs)
