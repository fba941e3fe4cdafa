"""What the full-size CUDA run depends on, proven on CPU: the compiled pipeline's graph budget (inductor,
fullgraph, dynamic=False, exactly as on CUDA), fixed eval/TTT shapes, attention import fall-through, GPTQ on
the training clock with TF32 off, no per-step/per-batch host syncs, a bf16 residual stream, bf16 Muon
collectives."""
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import FakeCtx as Ctx, HostSyncs, doc_stream, free_port, metric, random_model, run_script, stream, tiny_env
from conftest import tiny_hparams as hparams


# ---------------------------------------------------------------- the compiled pipeline, end to end

@pytest.fixture(scope="module")
def compiled_runs(tiny_tokenizer, tiny_data, tmp_path_factory):
    """The whole pipeline on 2 gloo ranks with frozen TTT blocks and uneven splits everywhere (825 sliding
    windows, 207 roundtrip windows, 26 TTT chunks of 8 sequences in batches of 3), compiled (COMPILE=1) and
    eager (COMPILE=0). The wall-clock cap is on (no stop is reached), so the GPTQ estimate runs too. Every
    model component is on: the PR #549 ones and the frontier's (layer 1 looped from step 0, lanes from
    layer 2, the BOS SmearGate, sparse attention and skip gates)."""
    out = {}
    for flag in ("1", "0"):
        d = tmp_path_factory.mktemp(f"compile{flag}")
        env = tiny_env(tiny_tokenizer, tiny_data, COMPILE=flag, TTT_FREEZE_BLOCKS=1, NUM_LOOPS=1, LOOP_START=1,
                       LOOP_END=1, ENABLE_LOOPING_AT=0, PARALLEL_START_LAYER=2, SMEAR_GATE="bos",
                       SPARSE_ATTN_GATE_ENABLED=1, SKIP_GATES_ENABLED=1, MUON_ROW_NORMALIZE=1, MUON_POLAR_EXPRESS=1, TTT_BATCH_SEQS=3, EVAL_BATCH_SEQS=16,
                       TTT_CHUNK_TOKENS=256, MAX_WALLCLOCK_SECONDS=3600, GPTQ_RESERVE_SECONDS=5, EVAL_BUDGET_SECONDS=10**6,
                       TRAIN_SEQ_SCHEDULE="16@1e-6,32@1", RUN_ID=f"c{flag}")
        r = run_script(d, env, nproc=2, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        out[flag] = (d / "logs" / f"c{flag}.txt").read_text().split("=" * 100)[-1]
    return out


@pytest.mark.slow
def test_compiled_pipeline_needs_six_graphs_and_matches_eager(compiled_runs):
    """Train step unlooped and looped at both lengths of TRAIN_SEQ_SCHEDULE (all compiled in the warm-up, none in
    the timed loop, which switches from 16 to 32 tokens at the first clock sync), eval batch and TTT step: 6
    graphs per rank, no graph break, the same numbers as eager."""
    log, eager = compiled_runs["1"], compiled_runs["0"]
    assert re.search(r"^compile:graphs:4 graph_breaks:0 recompile_limit:32 after:warmup$", log, re.M), log[-3000:]
    assert re.search(r"^layer_loop:enabled step:0 ", log, re.M)
    assert re.search(r"^loop_warmup_step:2/2 seq_len:32$", log, re.M)
    for run in (log, eager):
        assert re.search(r"^train_seq_len:switch step:10 frac:[\d.]+ seq_len:32$", run, re.M)  # the first sync
    assert re.search(r"^compile:graphs:5 graph_breaks:0 recompile_limit:32 after:training$", log, re.M)
    assert re.search(r"^compile:graphs:6 graph_breaks:0 recompile_limit:32 after:evaluation$", log, re.M)
    assert "compile:" not in eager and "ttt:budget_stop" not in log
    assert re.search(r"^ttt_sliding:params unfrozen=\d+ frozen=7348$", log, re.M)
    assert re.search(r"^gptq_solve_estimate:\d+ms$", log, re.M) and re.search(r"^gptq:done train_time:\d+ms$", log, re.M)
    for name in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"):
        assert metric(log, name) == pytest.approx(metric(eager, name), rel=1e-5), name
    assert metric(log, "legal_ttt_exact") != metric(log, "final_int6_sliding_window_exact")


@pytest.mark.slow
def test_compiled_lora_ttt_compiles_every_graph_in_its_warmup_and_matches_eager(sp, luts, monkeypatch):
    """Lora TTT under torch.compile (fullgraph, dynamic=False; AOTAutograd traces forward and backward, with
    the aot_eager backend: inductor's codegen of the same model is the pipeline test's, and would take
    minutes here): one graph per padded row length and one for the phases' SGD step, all compiled in the
    warm-up on random tokens, none in the timed pass, no graph break, and the score of eager. Every
    component that threads adapters is on: a looped layer, lanes, BOS smear, sparse and skip gates, VE."""
    from torch._dynamo.utils import counters
    h = hparams(NUM_LOOPS=1, LOOP_START=1, LOOP_END=1, PARALLEL_START_LAYER=2, SMEAR_GATE="bos",
                SPARSE_ATTN_GATE_ENABLED=1, SKIP_GATES_ENABLED=1, TTT_MODE="lora", TTT_CHUNK_SIZE=16,
                TTT_EVAL_SEQ_LEN=32, TTT_BATCH_SIZE=4, TTT_LORA_RANK=4, TTT_LORA_ALPHA=8, TTT_LORA_LR=0.01,
                PHASED_TTT_NUM_PHASES=1, PHASED_TTT_PREFIX_DOCS=4, GLOBAL_TTT_CHUNK_TOKENS=64,
                GLOBAL_TTT_BATCH_SEQS=4)
    assert tg.lora_row_lengths(h) == [16, 32]
    toks, _ = doc_stream(sp, 12, seed=4)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    out = {}
    for flag in (True, False):
        model = random_model(h)
        model.looping = True
        ctx = Ctx(master=True)
        ctx.compile = flag
        charged = tg.token_bytes(toks, luts)
        out[flag] = tg.eval_val_ttt_lora(model, tg.compile_model(model, ctx), toks, h, ctx, charged)[:2]
        if flag:
            tg.log_compiled_graphs(ctx, "the pass")
            graphs = [m for m in ctx.logs if m.startswith("compile:")]
            assert graphs == [f"compile:graphs:3 graph_breaks:0 recompile_limit:32 after:{when}"
                              for when in ("ttt_warmup", "the pass")], graphs
            assert any(m.startswith("ttpr: phase:1/1") for m in ctx.logs)
    assert out[True] == pytest.approx(out[False], rel=1e-6)


def test_every_eval_and_ttt_call_has_one_fixed_shape(sp, luts):
    """Roundtrip, sliding and TTT scoring always call the model with (EVAL_BATCH_SEQS, EVAL_SEQ_LEN) contiguous
    rows, TTT steps always with (rows, TRAIN_SEQ_LEN), on each of 2 ranks, for lengths that split unevenly
    everywhere; TTT_FREEZE_BLOCKS never flips requires_grad (a recompile guard)."""
    h = hparams(EVAL_SEQ_LEN=32, EVAL_STRIDE=8, EVAL_BATCH_SEQS=5, TTT_CHUNK_TOKENS=100, TTT_BATCH_SEQS=3,
                TTT_EPOCHS=1, TTT_FREEZE_BLOCKS=1)
    toks = stream(sp, 437)
    calls = set()
    for rank in (0, 1):
        model = random_model(h)

        def model_fn(x, y):
            calls.add((torch.is_inference_mode_enabled(), tuple(x.shape), x.stride(), tuple(y.shape),
                       all(p.requires_grad for p in model.parameters())))
            return model(x, y)

        ctx = Ctx(2, rank)
        tg.eval_val(model_fn, toks, h, ctx, tg.token_bytes(toks, luts))
        tg.eval_val_sliding(model_fn, toks, h, ctx, tg.token_bytes(toks, luts))
        tg.eval_val_ttt(model, model_fn, toks, h, ctx, tg.token_bytes(toks, luts), time.perf_counter())
    assert calls == {(True, (5, 32), (32, 1), (5, 32), True), (False, (2, 32), (32, 1), (2, 32), True)}, calls


# ---------------------------------------------------------------- attention backends

def test_flash_attn_import_failures_fall_through_to_sdpa(tmp_path, monkeypatch):
    """FlashAttention-4's namespace-only `flash_attn` (no flash_attn_func) and a `flash_attn_interface` whose
    build fails at import both fall through to SDPA; a working FA2 module is taken."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("def flash_attn_func(*a, **k): pass\n")
    (tmp_path / "flash_attn_interface.py").write_text("raise OSError('libcudart.so.12: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("flash_attn", "flash_attn.cute", "flash_attn_interface"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    assert tg._pick_attention(torch.device("cuda")) == ("sdpa", None)
    (tmp_path / "flash_attn" / "__init__.py").write_text("def flash_attn_func(q, k, v, causal): return q\n")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    name, fn = tg._pick_attention(torch.device("cuda"))
    assert name == "fa2" and fn.__module__ == "flash_attn"
    assert tg._pick_attention(torch.device("cpu")) == ("sdpa", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA kernel pinning is CUDA only")
def test_sdpa_is_pinned_to_fused_kernels_on_gpu():
    line = tg.pin_sdpa_kernels(tg.Hyperparameters({}))
    assert "math=False" in line and "fallback" not in line, line
    assert not torch.backends.cuda.math_sdp_enabled()


# ---------------------------------------------------------------- GPTQ on the training clock, TF32 off

def test_gptq_runs_on_the_training_clock_with_tf32_off(tiny_tokenizer, tiny_data, tmp_path, monkeypatch):
    """The GPTQ solve runs between calibration and `gptq:done` on the training clock (so the artifact's
    train_time includes it), Hessians and GPTQ run with TF32 off, and the precision is restored after."""
    monkeypatch.chdir(tmp_path)
    h = tg.Hyperparameters(tiny_env(tiny_tokenizer, tiny_data, ITERATIONS=4, MAX_WALLCLOCK_SECONDS=3600,
                                    GPTQ_RESERVE_SECONDS=5, RUN_ID="clock"))
    ctx = tg.Context(h)
    seen = []
    real_gptq, real_collect = tg.gptq_quantize, tg.collect_hessians

    def slow_gptq(*a, **k):
        seen.append(("gptq", torch.get_float32_matmul_precision()))
        time.sleep(0.05)
        return real_gptq(*a, **k)

    def collect(*a, **k):
        seen.append(("hessians", torch.get_float32_matmul_precision()))
        return real_collect(*a, **k)

    monkeypatch.setattr(tg, "gptq_quantize", slow_gptq)
    monkeypatch.setattr(tg, "collect_hessians", collect)
    val, val_bytes = tg.load_validation(h, ctx, tg.load_tokenizer(h.TOKENIZER_PATH, h.VOCAB_SIZE))
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what Context sets on CUDA
    try:
        path = tg.stage_train(h, ctx, val, val_bytes)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)
    n_groups = 4 * h.NUM_LAYERS + 1  # qkv, proj, fc, mlp.proj per layer, and the tied embedding (lm-head input)
    assert seen[0] == ("gptq", "highest") and len(seen) == 2 * n_groups + 1  # estimate, then the real solve
    assert set(seen) == {("gptq", "highest"), ("hessians", "highest")}
    log = (tmp_path / "logs" / "clock.txt").read_text().split("=" * 100)[-1]
    calib = int(re.search(r"^gptq:calibration end train_time:(\d+)ms", log, re.M).group(1))
    done = int(re.search(r"^gptq:done train_time:(\d+)ms$", log, re.M).group(1))
    est = int(re.search(r"^gptq_solve_estimate:(\d+)ms$", log, re.M).group(1))
    assert done - calib >= 50 * n_groups and est >= 50 * n_groups
    assert log.index("gptq:quantized") < log.index("gptq:done") < log.index("DIAGNOSTIC post_ema")
    _, meta, _ = tg.read_artifact(path)
    assert round(meta["train_time_ms"]) == done  # the artifact records the clock GPTQ ran on


# ---------------------------------------------------------------- host syncs

def test_evaluation_reads_no_gpu_value_per_batch(sp, luts):
    """Sliding eval over ~70 batches reads the device once (the final sums); TTT a bounded number of times per
    chunk (timing and the budget guard), never per batch or per step."""
    h = hparams(EVAL_SEQ_LEN=32, EVAL_STRIDE=8, EVAL_BATCH_SEQS=1, TTT_CHUNK_TOKENS=64, TTT_BATCH_SEQS=1, TTT_EPOCHS=2)
    toks = stream(sp, 300)
    model = random_model(h)
    with HostSyncs() as syncs:
        tg.eval_val_sliding(model, toks, h, Ctx(), tg.token_bytes(toks, luts), tg.TokenDump(300, "cpu"))
    assert syncs.count <= 1, syncs.count
    ctx = Ctx()
    counter = HostSyncs()
    ctx.sync = counter.bump
    n_chunks = -(-300 // 64)
    with counter:
        tg.eval_val_ttt(model, model, toks, h, ctx, tg.token_bytes(toks, luts), time.perf_counter(),
                        tg.TokenDump(300, "cpu"))
    assert counter.count <= 3 * n_chunks + 2, counter.count  # vs. 70 scoring batches + 16 TTT steps


class StepClock(tg.Clock):
    """A training clock that advances 100 ms per train_step (counted in `steps`), for a deterministic schedule."""
    steps = [0]

    def ms(self) -> float:
        return 100.0 * self.steps[0]


def _train(tiny_tokenizer, tiny_data, tmp_path, monkeypatch, syncs=None, **over):
    monkeypatch.chdir(tmp_path)
    h = tg.Hyperparameters(tiny_env(tiny_tokenizer, tiny_data, **{"WARMUP_STEPS": 0, "VAL_LOSS_EVERY": 0, **over}))
    ctx = tg.Context(h)
    val, val_bytes = tg.load_validation(h, ctx, tg.load_tokenizer(h.TOKENIZER_PATH, h.VOCAB_SIZE))
    marks, lrs, lengths = [], [], []
    real_step = tg.train_step

    def step(model_c, loader, opt, h_, ctx_, i, lr_mult, seq_len):
        marks.append(syncs.count if syncs else 0)
        lrs.append(lr_mult)
        lengths.append(seq_len)
        StepClock.steps[0] += 1
        return real_step(model_c, loader, opt, h_, ctx_, i, lr_mult, seq_len)

    monkeypatch.setattr(tg, "train_step", step)
    if syncs:
        monkeypatch.setattr(tg, "PROGRESS_SECONDS", float("inf"))  # a slow machine's progress line would sync
        ctx.sync = syncs.bump
        with syncs:
            tg.train_model(tg.build_model(h, ctx), h, ctx, tg.Budget(h), val, val_bytes)
    else:
        tg.train_model(tg.build_model(h, ctx), h, ctx, tg.Budget(h), val, val_bytes)
    _train.lengths = lengths
    return marks, lrs, (tmp_path / "logs" / f"{h.RUN_ID}.txt").read_text().split("=" * 100)[-1]


def test_training_waits_for_the_gpu_only_every_few_steps(tiny_tokenizer, tiny_data, tmp_path, monkeypatch):
    """Past the 10 logged steps, a training step makes no host sync except one clock reading every
    CLOCK_SYNC_EVERY steps (before: two synchronizes and one .item() in every step)."""
    marks, _, _ = _train(tiny_tokenizer, tiny_data, tmp_path, monkeypatch, HostSyncs(), ITERATIONS=41,
                         TRAIN_LOG_EVERY=0, MAX_WALLCLOCK_SECONDS=3600, GPTQ_RESERVE_SECONDS=5)
    per_step = np.diff(marks)[10:]  # syncs between the starts of steps 11..40
    assert len(per_step) == 30 and per_step.max() <= 2 and per_step.sum() <= 3, per_step.tolist()


def test_wallclock_stop_and_lr_follow_the_agreed_clock(tiny_tokenizer, tiny_data, tmp_path, monkeypatch):
    """At 100 ms per step and a 1.5 s budget (2 s cap - 0.5 s reserve), the clock read at step 10 plans the stop
    at step 15; the LR between readings extrapolates the agreed time (warmdown 4 steps = 400 ms)."""
    StepClock.steps[0] = 0
    monkeypatch.setattr(tg, "Clock", StepClock)
    _, lrs, log = _train(tiny_tokenizer, tiny_data, tmp_path, monkeypatch, ITERATIONS=100, WARMDOWN_ITERS=4,
                         MAX_WALLCLOCK_SECONDS=2, GPTQ_RESERVE_SECONDS=0.5, TRAIN_LOG_EVERY=0)
    assert lrs == pytest.approx([1.0] * 12 + [0.75, 0.5, 0.25])
    assert re.search(r"^step:15/100 val_loss:\S+ val_bpb:\S+ train_time:1500ms", log, re.M)
    assert re.search(r"^stopping_early: wallclock_cap train_time:1500ms step:15/100$", log, re.M)


def test_progressive_context_switches_at_the_agreed_step_with_an_lr_ramp(tiny_tokenizer, tiny_data, tmp_path,
                                                                          monkeypatch):
    """TRAIN_SEQ_SCHEDULE=16@0.5,32@1.0 at 100 ms per step and a 1.5 s budget: the agreed clock first says 1000 ms
    (share 0.67) at step 10, so steps 0-9 run 16-token rows and steps 10-14 32-token rows (the same tokens per step,
    every rank: the share is the agreed clock's); the LR ramps over SEQ_CHANGE_WARMUP_STEPS=3 steps after it."""
    StepClock.steps[0] = 0
    monkeypatch.setattr(tg, "Clock", StepClock)
    _, lrs, log = _train(tiny_tokenizer, tiny_data, tmp_path, monkeypatch, ITERATIONS=100, WARMDOWN_ITERS=0,
                         MAX_WALLCLOCK_SECONDS=2, GPTQ_RESERVE_SECONDS=0.5, TRAIN_LOG_EVERY=0,
                         TRAIN_SEQ_SCHEDULE="16@0.5,32@1.0", SEQ_CHANGE_WARMUP_STEPS=3)
    assert _train.lengths == [16] * 10 + [32] * 5
    assert lrs == pytest.approx([1.0] * 10 + [1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert re.search(r"^train_seq_len:switch step:10 frac:0.667 seq_len:32$", log, re.M)


def _schedule_worker(rank, world, port, env, out):
    """train_model on one of `world` gloo ranks whose clocks disagree: rank r's reads (r + 1) x 100 ms per step.
    Writes the sequence length of each of its training steps."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    h = tg.Hyperparameters(env)
    ctx = tg.Context(h)
    lengths, real_step = [], tg.train_step

    def step(model_c, loader, opt, h_, ctx_, i, lr_mult, seq_len):
        lengths.append(seq_len)
        return real_step(model_c, loader, opt, h_, ctx_, i, lr_mult, seq_len)

    class RankClock(tg.Clock):
        def ms(self) -> float:
            return 100.0 * (rank + 1) * len(lengths)

    tg.train_step, tg.Clock = step, RankClock
    val, val_bytes = tg.load_validation(h, ctx, tg.load_tokenizer(h.TOKENIZER_PATH, h.VOCAB_SIZE))
    tg.train_model(tg.build_model(h, ctx), h, ctx, tg.Budget(h), val, val_bytes)
    Path(f"{out}.{rank}").write_text(" ".join(map(str, lengths)))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_progressive_context_switches_at_the_same_step_on_every_rank(tiny_tokenizer, tiny_data, tmp_path, monkeypatch):
    """2 gloo ranks whose clocks disagree (100 and 200 ms per step): the agreed clock (the slower) decides, so both
    switch from 16 to 32 tokens at step 10 (2000 of 3500 ms: share 0.57 >= 0.5; rank 0's own clock would say
    0.29) and stop together at step 17."""
    monkeypatch.chdir(tmp_path)
    env = tiny_env(tiny_tokenizer, tiny_data, WARMUP_STEPS=0, ITERATIONS=100, MAX_WALLCLOCK_SECONDS=4,
                   GPTQ_RESERVE_SECONDS=0.5, TRAIN_LOG_EVERY=0, TRAIN_SEQ_SCHEDULE="16@0.5,32@1.0")
    torch.multiprocessing.spawn(_schedule_worker, args=(2, free_port(), env, tmp_path / "lengths"), nprocs=2,
                                join=True)
    runs = [(tmp_path / f"lengths.{r}").read_text().split() for r in (0, 1)]
    assert runs[0] == runs[1] == ["16"] * 10 + ["32"] * 7


def test_progressive_context_without_a_cap_follows_the_step_share_and_checks_the_batch(tiny_tokenizer, tiny_data):
    """Uncapped, the share is step / ITERATIONS; every length of the schedule must divide the rank's batch."""
    h = tg.Hyperparameters(tiny_env(tiny_tokenizer, tiny_data, TRAIN_SEQ_SCHEDULE="8@0.25,16@0.5,32@1"))
    assert [tg.train_seq_len(h, s / 12) for s in range(12)] == [8] * 3 + [16] * 3 + [32] * 6
    bad = tg.Hyperparameters(tiny_env(tiny_tokenizer, tiny_data, TRAIN_SEQ_SCHEDULE="24@0.5,32@1"))
    with pytest.raises(ValueError, match=r"TRAIN_BATCH_TOKENS=1024 must be a multiple of .*sequence length 24"):
        tg.local_batch_tokens(bad, Ctx())


@pytest.mark.parametrize("step, elapsed, stop, sync", [(10, 1000.0, 100, 20), (10, 1600.0, 100, 11), (10, 3450.0, 10, 11),
                                                   (20, 3600.0, 20, 21), (20, 3520.0, 20, 21)])
def test_budget_plans_syncs_and_the_stop_from_the_agreed_clock(step, elapsed, stop, sync):
    """A 4 s cap less a 0.5 s reserve: the clock is read every 10 steps, and every step once 10 steps with a
    10x stall among them (20 mean steps) could end past 3.5 s; the stop comes when one more step would."""
    capped = tg.Budget(hparams(ITERATIONS=100, MAX_WALLCLOCK_SECONDS=4, GPTQ_RESERVE_SECONDS=0.5))
    capped.agree(step, elapsed)
    assert (capped.stop_at, capped.next_sync) == (stop, sync) and capped.elapsed(2 * step) == 2 * elapsed
    uncapped = tg.Budget(hparams(ITERATIONS=100, MAX_WALLCLOCK_SECONDS=0))
    uncapped.agree(step, elapsed)
    assert (uncapped.stop_at, uncapped.next_sync) == (100, step + 10)
    assert uncapped.calibration_deadline() == float("inf")


def simulate_training(budget: tg.Budget, step_ms) -> tuple[float, int, float, int]:
    """train_model's stop and sync logic on a fake clock: step i takes step_ms(i) ms.
    -> (clock at the stop, steps, the last step's ms, clock readings)."""
    t, step, dur, syncs = 0.0, 0, 0.0, 0
    while step != budget.stop_at:
        dur = step_ms(step)
        t, step = t + dur, step + 1
        if step == budget.next_sync:
            budget.agree(step, t)
            syncs += 1
    return t, step, dur, syncs


@pytest.mark.parametrize("slow_at", list(range(0, 40, 3)) + [30, 31, 32, 33, 34])
def test_stop_is_at_most_one_step_late_when_a_step_takes_10x_longer(slow_at):
    """100 ms steps, one of them 1 s (a stall, a slow collective), against a 3.5 s training budget: the last
    step always starts within the budget (so the stop is at most one step late), the run does not stop more
    than the slow step early, and the clock is read every step only near the end. Reading it every 10 steps
    with a planned stop (the previous scheme) started up to 4 steps past the budget here, ending 900 ms late,
    and stopped 800 ms early after an early stall."""
    budget = tg.Budget(hparams(ITERATIONS=1000, MAX_WALLCLOCK_SECONDS=4, GPTQ_RESERVE_SECONDS=0.5))
    t, steps, last_ms, syncs = simulate_training(budget, lambda i: 1000.0 if i == slow_at else 100.0)
    assert t - last_ms < budget.train_ms and t > budget.train_ms - 1000.0, (t, steps)
    assert syncs <= steps // 10 + tg.CLOCK_SYNC_EVERY + tg.STALL_FACTOR + tg.SLOW_STEP_WINDOW, syncs


def test_stop_follows_steps_that_slow_down_near_the_end():
    """From step 30 every step takes 3x longer (the loop switch, thermal throttling): the per-step readings
    near the end see it, and the last step still starts within the budget."""
    budget = tg.Budget(hparams(ITERATIONS=1000, MAX_WALLCLOCK_SECONDS=4, GPTQ_RESERVE_SECONDS=0.5))
    t, _, last_ms, _ = simulate_training(budget, lambda i: 300.0 if i >= 30 else 100.0)
    assert t - last_ms < budget.train_ms < t + 300.0


class StallClock(StepClock):
    """100 ms per step, and step 13 takes 1 s."""

    def ms(self) -> float:
        return 100.0 * self.steps[0] + (900.0 if self.steps[0] >= 13 else 0.0)


def test_training_stops_right_after_a_stall_near_the_end(tiny_tokenizer, tiny_data, tmp_path, monkeypatch):
    """train_model reads the clock every step near the end: a 1 s stall in step 13 of a 1.5 s budget ends
    training at step 13 (2.2 s) instead of the planned step 15 (2.4 s)."""
    StepClock.steps[0] = 0
    monkeypatch.setattr(tg, "Clock", StallClock)
    _, _, log = _train(tiny_tokenizer, tiny_data, tmp_path, monkeypatch, ITERATIONS=100, WARMDOWN_ITERS=4,
                       MAX_WALLCLOCK_SECONDS=2, GPTQ_RESERVE_SECONDS=0.5, TRAIN_LOG_EVERY=0)
    assert re.search(r"^stopping_early: wallclock_cap train_time:2200ms step:13/100$", log, re.M), log[-2000:]


def test_budget_deadlines_and_cap():
    h = hparams(MAX_WALLCLOCK_SECONDS=600, GPTQ_RESERVE_SECONDS=12)
    b = tg.Budget(h, gptq_ms=8000.0)
    assert b.train_ms == 588_000 and b.calibration_deadline() == 600_000 - tg.GPTQ_SOLVE_MARGIN * 8000
    assert b.over_cap(599_999.0) == 0 and b.over_cap(600_250.0) == 250.0
    assert tg.Budget(hparams(MAX_WALLCLOCK_SECONDS=0)).over_cap(1e9) == 0


# ---------------------------------------------------------------- bf16 residual stream

def test_residual_stream_is_bf16_under_autocast():
    """With the CUDA activation dtype, every block's inputs (x, x0) and output are bf16 under bf16 autocast (the
    fp32 embeddings used to keep the whole stream fp32), and the loss stays close to fp32."""
    h = hparams()
    model = random_model(h)
    x = torch.randint(0, h.VOCAB_SIZE, (2, 32))
    with torch.no_grad():
        ref = model(x, x)
    model.act_dtype = torch.bfloat16
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, args[1].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        nll = model(x, x)
    assert seen == [(torch.bfloat16,) * 3] * h.NUM_LAYERS, seen
    assert nll.dtype == torch.float32 and (nll - ref).abs().max() < 0.05


# ---------------------------------------------------------------- Muon collectives

def _muon_worker(rank, world, port, comm_dtype, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dist = torch.distributed
    seen = []
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        real = getattr(dist, name)

        def spy(a, b, async_op=False, _real=real, _name=name):
            seen.append((_name, a.dtype, b.dtype, async_op))
            return _real(a, b, async_op=async_op)

        setattr(dist, name, spy)
    banks, grads = _muon_problem()
    h = hparams()
    muon = tg.ParallelMuon(banks, h, world, comm_dtype)
    for g in grads:
        for b, gb in zip(banks, g[rank]):
            b.grad = gb.clone()
        muon.launch_reduce()
        muon.finish_reduce()
        muon.step(h.MATRIX_LR, 0.95, torch.tensor(1.0))
    if rank == 0:
        torch.save({"banks": [b.detach() for b in banks], "seen": seen}, out)
    dist.barrier()
    dist.destroy_process_group()


def _muon_problem():
    """3 banks (one with a row count that needs padding over 2 ranks) and 2 steps of per-rank gradients."""
    g = torch.Generator().manual_seed(0)
    banks = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((3, 16, 8), (4, 8, 8), (2, 8, 24))]
    grads = [[[torch.randn(b.shape, generator=g) for b in banks] for _ in range(2)] for _ in range(2)]
    return banks, grads


def test_muon_collectives_are_bf16_async_and_match_one_rank(tmp_path):
    """On 2 gloo ranks with comm_dtype bf16, both collectives move bf16 asynchronously, and the banks match one
    process given the mean gradient, within bf16 rounding."""
    torch.multiprocessing.spawn(_muon_worker, args=(2, free_port(), torch.bfloat16, tmp_path / "two.pt"), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt")
    assert {(n, a, b, asy) for n, a, b, asy in two["seen"]} == {
        ("reduce_scatter_tensor", torch.bfloat16, torch.bfloat16, True),
        ("all_gather_into_tensor", torch.bfloat16, torch.bfloat16, True)}
    banks, grads = _muon_problem()
    start = [b.detach().clone() for b in banks]
    h = hparams()
    muon = tg.ParallelMuon(banks, h, 1)
    for g in grads:
        for b, g0, g1 in zip(banks, g[0], g[1]):
            b.grad = (g0 + g1) / 2
        muon.launch_reduce()
        muon.finish_reduce()
        muon.step(h.MATRIX_LR, 0.95, torch.tensor(1.0))
    for b, b2, b0 in zip(banks, two["banks"], start):
        step1, step2 = b.detach() - b0, b2 - b0
        assert (step2 - step1).abs().max() < 0.05 * step1.abs().max(), (step2 - step1).abs().max()
        assert step1.abs().max() > 1e-3
