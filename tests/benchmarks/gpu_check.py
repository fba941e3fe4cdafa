#!/usr/bin/env python3
"""The prepared GPU check (issue 30): what only a GPU can show, in one call of at most 9 minutes.

    python tests/benchmarks/gpu_check.py --prepare ../parameter-golf   # here, once: fills .gpu_check/
    python tests/benchmarks/gpu_check.py --dry-run                      # here: every part at tiny shapes, CPU
    # on a lent H100/H200 (the device tool's run, carry [".gpu_check"], timeout 600):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_check/wheels/*.whl &&
        PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 tests/benchmarks/gpu_check.py --out-dir $OUT

--prepare copies PR #549's record script out of an openai/parameter-golf checkout (checked by its sha256,
never committed: .gpu_check/ is git-ignored) and downloads the wheels the device lacks (zstandard, brotli,
zpaq: the versions installed here, for its Python 3.12). Each part below is one process. All start at once,
compile and warm up together, then each is timed alone (none compiling beside it unless time runs short),
in this order; a part that dies of CUDA out-of-memory before its turn is run again alone at the end.

  train_pr549, train_sp8192  our step at the per-rank shape of 8 GPUs (48 x 2048 tokens: forward, backward,
                             optimizer; compiled; sp8192 unlooped and looped): compile s, graphs, peak memory,
                             median ms, tokens/s, MFU, steps reachable in the training budget
  train_theirs               PR #549's record script's GPT and optimizers, stepped as its main loop steps them
                             (its FA3 import pointed at our SDPA call when FA3 is absent): ms, ours/theirs
  eval_pr549                 sliding windows/s and chunk TTT tokens/s as rank 0 of 8 runs them
  lora_sp8192                LoRA TTT documents/s as rank 0 of 8 runs them, on the real validation documents'
                             lengths (the shipped sample's) scaled to the full split's mean
  quant_pr549, quant_sp8192  Hessians, the GPTQ solve (against the run's own estimate) and the cap fit

Every projection to 8 GPUs leaves out the collectives (one GPU here) and uses random tokens. The report goes
to --out-dir as <device>_<date>.md, the parts' logs beside it.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

PREPARED = ROOT / ".gpu_check"
PR549_RECORD = "records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon/train_gpt.py"
PR549_SHA256 = "41beffa45d9c8643eee871e869b8314801372ec2ad153a7d21ffbd2e056fce02"
WHEELS = ("zstandard", "brotli", "zpaq")  # train_gpt.py's codecs; the device image has none of them
PLATFORMS = "manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64"
VAL_TARGETS = {1024: 62_021_632, 8192: 40_540_160}  # scored targets of the challenge's validation split
VAL_DOCS = 50_000
PEAK_TFLOPS = 989.0  # H100 and H200 SXM, dense bf16
WORLD = 8  # the competition's GPUs: evaluation parts run rank 0's share of an 8-rank pass
FULL = dict(seqs=48, steps=25, windows=4096, chunks=16, docs=2048, doc_mean=0, calib=8)  # 0: the split's mean
TINY = dict(seqs=2, steps=3, windows=16, chunks=3, docs=24, doc_mean=48, calib=2)
TINY_SHAPE = dict(MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128,
                  TTT_EVAL_SEQ_LEN=128, EVAL_BATCH_SEQS=8, TTT_CHUNK_TOKENS=512, TTT_BATCH_SEQS=4,
                  TTT_BATCH_SIZE=4, GLOBAL_TTT_CHUNK_TOKENS=512, GLOBAL_TTT_BATCH_SEQS=4)
TIMED_LIMIT = 150  # seconds a part may take once it is told to go


# ---------------------------------------------------------------------------------------------------------
# A part's side: its settings, the gate, its rows
# ---------------------------------------------------------------------------------------------------------

class Part:
    """One part's process. Rows are saved as they come, so a part killed at the deadline keeps them."""

    def __init__(self, name: str, work: Path | None, dry: bool, compile_: bool):
        self.name, self.work, self.dry = name, work, dry
        self.n = TINY if dry else FULL
        self.compile = "1" if compile_ or not dry else "0"
        self.rows: list[tuple[str, str]] = []

    def row(self, measure: str, value):
        self.rows.append((measure, str(value)))
        print(f"{self.name}: {measure}: {value}", flush=True)
        if self.work:
            (self.work / f"{self.name}.json").write_text(json.dumps(self.rows))

    def settings(self, preset: str, **extra) -> dict:
        env = dict(PRESET=preset, RUN_ID=f"gpu_check_{self.name}", COMPILE=self.compile)
        return {k: str(v) for k, v in (env | (TINY_SHAPE if self.dry else {}) | extra).items()}

    def setup(self, preset: str, **extra):
        """Our Hyperparameters and Context for one rank's step of WORLD (its batch, no accumulation)."""
        h = tg.Hyperparameters(self.settings(preset, **extra))
        ctx = tg.Context(h)
        h.TRAIN_BATCH_TOKENS = self.n["seqs"] * h.TRAIN_SEQ_LEN * ctx.world
        ctx.grad_accum = 1
        backend = tg.set_attention_backend(ctx.device)
        if ctx.cuda and backend == "sdpa":
            backend += f" ({tg.pin_sdpa_kernels(h)})"
        self.row("attention", backend)
        return h, ctx

    def gate(self, ctx=None):
        """Says it is ready (compiled, warmed up), then waits until the parent lets it time."""
        if ctx is not None and ctx.cuda:
            torch.cuda.empty_cache()  # hold only live tensors while the others warm up
        if self.work is not None:
            (self.work / f"{self.name}.ready").touch()
            go = self.work / f"{self.name}.go"
            while not go.exists():
                time.sleep(0.1)
            if go.read_text():
                self.row("timed while others compiled", go.read_text())
        self.graphs = graphs()

    def end(self):
        self.row("graphs compiled while timed (0: the warm-up compiled all)", graphs() - self.graphs)


def trained_looking(model):
    """Non-zero output projections (zero-initialized): GPTQ and the codecs see matrices, not zeros."""
    with torch.no_grad():
        model.qo_bank[model.qo_bank.size(0) // 2:].normal_(std=0.02)
        model.mlp_down_bank.normal_(std=0.02)
    return model


class RandomLoader:
    def __init__(self, vocab: int, device):
        self.vocab, self.device = vocab, device

    def next_batch(self, local: int, seq_len: int):
        x = torch.randint(0, self.vocab, (local // seq_len, seq_len + 1), device=self.device)
        return x[:, :-1], x[:, 1:]


def step_ms(fn, ctx, n: int) -> list[float]:
    """Each of n calls' time in ms: CUDA events (no host sync between steps), else the host clock."""
    if not ctx.cuda:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t))
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def timed(fn, ctx):
    """(fn(), its seconds, the GPU's work included)"""
    t = time.perf_counter()
    out = fn()
    ctx.sync()
    return out, time.perf_counter() - t


def graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def step_flops(model, h, tokens: int) -> float:
    """Forward + backward FLOPs of one step: 6 per weight of each matrix a token passes (a looped layer's
    once per pass; the tied head too; embedding tables are lookups), plus causal attention (6 T^2 d a row)."""
    n, order = h.NUM_LAYERS, model.order()
    layer = [sum(getattr(model, s.bank)[s.slot * n + i].numel() for s in tg.BANK_SLOTS) for i in range(n)]
    lookups = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    banks = sum(getattr(model, b).numel() for b in tg.BANKS)
    others = sum(p.numel() for p in model.parameters() if p.ndim >= 2) - lookups - banks  # VE, bigram proj.
    dense = others + sum(layer[i] for i in order) + h.VOCAB_SIZE * h.MODEL_DIM  # + the tied head
    return 6 * tokens * dense + 6 * len(order) * tokens * h.TRAIN_SEQ_LEN * h.MODEL_DIM


def time_steps(part: Part, label: str, step, ctx, tokens: int, flops: float | None = None) -> float:
    """Times part.n["steps"] steps: median and mean ms, tokens/s, MFU (given the FLOPs), peak memory."""
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = step_ms(step, ctx, part.n["steps"])
    med = statistics.median(ms)
    part.row(f"{label} step ms (median of {len(ms)}; mean)", f"{med:.2f}; {statistics.mean(ms):.2f}")
    part.row(f"{label} tokens/s", f"{tokens / med * 1000:,.0f}")
    if flops:
        tflops = flops / med / 1e9
        mfu = 100 * tflops / PEAK_TFLOPS
        part.row(f"{label} model TFLOP/s (MFU at {PEAK_TFLOPS:.0f})", f"{tflops:.1f} ({mfu:.1f}%)")
    if ctx.cuda:
        part.row(f"{label} peak memory MiB", torch.cuda.max_memory_allocated() // 2**20)
    return med


# ---------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------

def train_ours(part: Part, preset: str):
    h, ctx = part.setup(preset)
    model = trained_looking(tg.build_model(h, ctx))
    model_c = tg.compile_model(model, ctx)
    opt, loader = tg.Optimizers(model, h, ctx.world), RandomLoader(h.VOCAB_SIZE, ctx.device)
    L, tokens = h.TRAIN_SEQ_LEN, part.n["seqs"] * h.TRAIN_SEQ_LEN
    states = (False, True) if h.NUM_LOOPS else (False,)
    step = lambda: tg.train_step(model_c, loader, opt, h, ctx, 100, 1.0, L)  # noqa: E731 (past warm-up)
    part.row("params", f"{sum(p.numel() for p in model.parameters()):,}")
    for looping in states:
        model.looping = looping
        label = "looped" if looping else "plain"
        part.row(f"{label} first step s (compile)", f"{timed(step, ctx)[1]:.1f}")
        part.row(f"{label} layer passes", len(model.order()))
        step()
    part.row("compiled graphs", graphs())
    part.gate(ctx)
    med = {}
    for looping in states:
        model.looping = looping
        label = "looped" if looping else "plain"
        med[looping] = time_steps(part, label, step, ctx, tokens, step_flops(model, h, tokens))
    train_ms = 1000 * (h.MAX_WALLCLOCK_SECONDS - h.GPTQ_RESERVE_SECONDS)
    share = h.ENABLE_LOOPING_AT if h.NUM_LOOPS else 1.0  # of the training time spent unlooped
    steps = share * train_ms / med[False] + (1 - share) * train_ms / med.get(True, med[False])
    part.row(f"steps in {train_ms / 1000:.0f} s at this step time (8 GPUs, no collectives)", f"{steps:,.0f}")
    part.end()


def sdpa_as_fa3():
    """PR #549 imports FA3's flash_attn_func; where FA3 is absent, the same call runs our SDPA attention
    (same layout, GQA in the kernel, the same pinned SDPA kernels)."""
    try:
        importlib.import_module("flash_attn_interface")  # FA3: its script runs as it is
        return "fa3"
    except Exception:
        shim = types.ModuleType("flash_attn_interface")
        shim.flash_attn_func = lambda q, k, v, causal=True: tg.causal_attention(q, k, v)
        sys.modules["flash_attn_interface"] = shim
        return "sdpa (shim for flash_attn_interface)"


def their_model(mod, ctx):
    """PR #549's model and optimizers as its main() builds them: (the model, its step)."""
    a = mod.Hyperparameters()
    args = inspect.signature(mod.GPT).parameters  # its main() passes each from the setting of that name
    m = mod.GPT(**{n: getattr(a, "dtg_enabled" if n == "dtg" else n) for n in args}).to(ctx.device).bfloat16()
    banks = [m.qo_bank, m.kv_bank, m.mlp_up_bank, m.mlp_down_bank]
    for p in banks:
        p.data = p.data.float()
    for module in m.modules():
        if isinstance(module, mod.CastedLinear):
            module.float()
    mod.restore_low_dim_params_to_fp32(m)
    # its main()'s optimizer split: banks to Muon, embedding tables to one AdamW, control tensors to another
    tok = [m.tok_emb.weight] + [e.embed.weight for e in (m.bigram, m.ve_shared) if e is not None]
    rest = [p for name, p in m.blocks.named_parameters()
            if p.ndim < 2 or any(c in name for c in mod.CONTROL_TENSOR_NAME_PATTERNS)]
    rest += [m.skip_weights] * (m.skip_weights.numel() > 0) + [m.smear.gate]
    if m.bigram is not None:
        rest += [m.bigram.scale] + [m.bigram.proj.weight] * (m.bigram.proj is not None)
    if m.ve_shared is not None:
        rest += [m.ve_shared.scale, *m.ve_layer_scales]
        rest += [m.ve_shared.proj.weight] * (m.ve_shared.proj is not None)
    beta = (a.beta1, a.beta2)
    opts = [torch.optim.AdamW([{"params": tok, "lr": a.tied_embed_lr}], betas=beta, eps=a.adam_eps,
                              weight_decay=a.adam_wd, fused=True),
            torch.optim.AdamW([{"params": rest, "lr": a.scalar_lr}], betas=beta, eps=a.adam_eps,
                              weight_decay=a.adam_wd, fused=True)]
    muon = mod.Muon(banks, lr=a.matrix_lr, momentum=a.muon_momentum, backend_steps=a.muon_backend_steps,
                    weight_decay=a.muon_wd)
    compiled = torch.compile(m, dynamic=False, fullgraph=True) if ctx.compile else m
    loader = RandomLoader(a.vocab_size, ctx.device)

    def step():  # its main loop's step: forward, backward, clip, Muon's reduce launch, Adam, Muon, zero
        x, y = loader.next_batch(a.train_batch_tokens // WORLD, a.train_seq_len)
        with ctx.autocast():
            loss = compiled(x, y)
        loss.backward()
        if a.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(m.parameters(), a.grad_clip_norm)
        muon.launch_reduce_scatters()
        for o in opts:
            o.step()
        muon.step()
        for o in opts + [muon]:
            o.zero_grad(set_to_none=True)
    return m, step


def shared_settings(path: Path, h) -> dict[str, str]:
    """The settings PR #549's script reads that are ours too, at our values (our defaults are its record
    run's command; in a dry run, the tiny shape)."""
    names = set(re.findall(r'os\.environ\.get\("([A-Z0-9_]+)"', path.read_text()))
    shared = {n: getattr(h, n) for n in names & set(tg.DEFAULTS)}
    return {n: str(int(v)) if isinstance(v, bool) else str(v) for n, v in shared.items()}


def train_theirs(part: Part):
    path = PREPARED / "pr549" / "train_gpt.py"
    if not path.exists():
        part.row("skipped", f"no copy of PR #549's script at {path.relative_to(ROOT)}: run --prepare")
        return
    h, ctx = part.setup("pr549")  # the same attention kernels as ours
    batch = part.n["seqs"] * h.TRAIN_SEQ_LEN * WORLD
    os.environ.update(shared_settings(path, h), TRAIN_BATCH_TOKENS=str(batch))
    part.row("attention (theirs)", sdpa_as_fa3())
    spec = importlib.util.spec_from_file_location("pr549_record", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, step = their_model(mod, ctx)
    part.row("params", f"{sum(p.numel() for p in model.parameters()):,}")
    part.row("plain first step s (compile)", f"{timed(step, ctx)[1]:.1f}")
    step()
    part.row("compiled graphs", graphs())
    part.gate(ctx)
    time_steps(part, "plain", step, ctx, part.n["seqs"] * h.TRAIN_SEQ_LEN)  # same FLOPs as ours: same model
    part.end()


def as_rank0(ctx):
    """Rank 0 of WORLD without a process group: every rank_share / rank_span gives its share, and the
    collectives (ctx.any, max_across, all-reduces) are skipped as in a one-process run."""
    ctx.world, ctx.rank = WORLD, 0


def random_val(n: int, vocab: int, device):
    val = torch.randint(2, vocab, (n,), device=device)
    return val, torch.ones_like(val, dtype=torch.int32)  # one byte per token: rates, not bpb, matter here


def eval_pr549(part: Part):
    h, ctx = part.setup("pr549")
    as_rank0(ctx)
    model = trained_looking(tg.build_model(h, ctx)).eval()
    model_c = tg.compile_model(model, ctx)
    W, S, C = h.EVAL_SEQ_LEN, h.EVAL_STRIDE, h.TTT_CHUNK_TOKENS
    windows = WORLD * part.n["windows"]  # rank 0 scores part.n["windows"] of them
    sliding = random_val(windows * S + W + 1, h.VOCAB_SIZE, ctx.device)
    ttt = random_val(part.n["chunks"] * C + 1, h.VOCAB_SIZE, ctx.device)
    warm = random_val(2 * C + 1, h.VOCAB_SIZE, ctx.device)
    slide = lambda val: tg.eval_val_sliding(model_c, val[0], h, ctx, val[1])  # noqa: E731
    run_ttt = lambda val: tg.eval_val_ttt(model, model_c, val[0], h, ctx, val[1], time.perf_counter())  # noqa
    part.row("sliding warm-up s (compile)", f"{timed(lambda: slide(warm), ctx)[1]:.1f}")
    part.row("chunk TTT warm-up s (compile)", f"{timed(lambda: run_ttt(warm), ctx)[1]:.1f}")
    part.row("compiled graphs", graphs())
    part.gate(ctx)
    s = timed(lambda: slide(sliding), ctx)[1]
    rate = part.n["windows"] / s
    full = VAL_TARGETS[h.VOCAB_SIZE] // S / WORLD / rate
    part.row(f"sliding windows/s, rank 0 ({W} tokens, stride {S})", f"{rate:,.0f}")
    part.row("sliding, full split on 8 GPUs (s)", f"{full:.1f}")
    s = timed(lambda: run_ttt(ttt), ctx)[1]
    tokens = part.n["chunks"] * C
    part.row(f"chunk TTT tokens/s, all ranks ({part.n['chunks']} chunks of {C}, {h.TTT_EPOCHS} epochs)",
             f"{tokens / s:,.0f}")
    part.row("chunk TTT, full split on 8 GPUs (s)", f"{VAL_TARGETS[h.VOCAB_SIZE] / (tokens / s):.1f}")
    part.end()


def sample_doc_lengths(n: int, mean: float, seed: int = 0):
    """n document lengths (targets) drawn from the shipped sample's validation documents, scaled so that
    their mean is `mean` (the full split's): the real shape of the distribution at the split's mean."""
    toks = torch.from_numpy(tg.read_shard(str(ROOT / "data/sample/fineweb_val_000000.bin")).astype("int64"))
    real = tg.find_docs(toks)[:, 1]
    picked = np.random.default_rng(seed).choice(real, n)
    return np.maximum(2, np.round(picked * mean / picked.mean())).astype(np.int64)


def doc_stream(lengths, vocab: int, device):
    """Random tokens, a BOS starting each document: a stream find_docs cuts into `lengths` targets each."""
    starts = torch.from_numpy(lengths).cumsum(0) - torch.from_numpy(lengths)
    val = torch.randint(2, vocab, (int(lengths.sum()) + 1,))
    val[starts] = tg.BOS_ID
    return val.to(device), torch.ones(val.numel(), dtype=torch.int32, device=device)


def lora_sp8192(part: Part):
    n_docs = part.n["docs"]
    prefix = max(1, round(tg.DEFAULTS["PHASED_TTT_PREFIX_DOCS"] * n_docs / VAL_DOCS))  # the split's share
    h, ctx = part.setup("sp8192", PHASED_TTT_PREFIX_DOCS=prefix)
    as_rank0(ctx)
    model = trained_looking(tg.build_model(h, ctx))
    model.looping = h.NUM_LOOPS > 0
    model_c = tg.compile_model(model, ctx)
    lengths = sample_doc_lengths(n_docs, part.n["doc_mean"] or VAL_TARGETS[h.VOCAB_SIZE] / VAL_DOCS)
    val, val_bytes = doc_stream(lengths, h.VOCAB_SIZE, ctx.device)
    run = tg.LoraTTT(model, model_c, val, h, ctx, val_bytes, None)
    part.row("warm-up s (compile: rows " + ",".join(map(str, run.lengths)) + ", the pause)",
             f"{timed(lambda: run.warmup(pauses=True), ctx)[1]:.1f}")
    part.row("compiled graphs", graphs())
    part.gate(ctx)
    _, _, s = tg.eval_val_ttt_lora(model, model_c, val, h, ctx, val_bytes)
    part.row(f"documents (mean {lengths.mean():.0f} targets), pause prefix", f"{n_docs}, {prefix}")
    part.row("rank 0's share on 8 GPUs (s)", f"{s:.2f}")
    part.row("documents/s, all 8 ranks", f"{n_docs / s:,.1f}")
    part.row(f"LoRA TTT, full split ({VAL_DOCS:,} documents) on 8 GPUs (s)", f"{s * VAL_DOCS / n_docs:.1f}")
    part.end()


def quant(part: Part, preset: str):
    part.gate()  # nothing to compile: waits holding no GPU memory
    h, ctx = part.setup(preset)
    model = trained_looking(tg.build_model(h, ctx))
    model.looping = h.NUM_LOOPS > 0
    estimate, s = timed(lambda: tg.estimate_gptq_ms(model, h, ctx), ctx)
    part.row("the run's GPTQ estimate (ms, identity Hessians; s to make it)", f"{estimate:.0f}; {s:.1f}")
    batches, h.GPTQ_CALIB_BATCHES = h.GPTQ_CALIB_BATCHES, min(part.n["calib"], h.GPTQ_CALIB_BATCHES)
    clock, loader = tg.Clock(ctx), RandomLoader(h.VOCAB_SIZE, ctx.device)
    clock.start()
    with tg.fp32_matmuls():
        budget = tg.Budget(h, estimate)
        hess, s = timed(lambda: tg.collect_hessians(model, loader, h, ctx, clock, budget), ctx)
        per = s / h.GPTQ_CALIB_BATCHES
        part.row(f"Hessians s per batch of {part.n['seqs']}x{h.TRAIN_SEQ_LEN}; at {batches} batches",
                 f"{per:.3f}; {per * batches:.1f}")
        entries, solve = timed(lambda: tg.quantize_state(model, hess, h, ctx), ctx)
    part.row("GPTQ solve s (real Hessians)", f"{solve:.1f}")
    part.row(f"calibration + solve vs GPTQ_RESERVE_SECONDS={h.GPTQ_RESERVE_SECONDS:.0f}",
             f"{per * batches + solve:.1f} s")
    _, code = tg.code_sizes()
    config = tg.model_config(h)
    blob, s = timed(lambda: tg.fit_artifact(entries, config, {}, code, h.SIZE_CAP_BYTES, ctx), ctx)
    part.row("pack and fit under the cap s (untrained weights)", f"{s:.1f}")
    part.row("artifact bytes: model + code = total", f"{len(blob):,} + {code:,} = {len(blob) + code:,}")


# name: (what runs in its process, its report's title), in the order they are timed
PARTS = {
    "train_pr549": (lambda p: train_ours(p, "pr549"), "PRESET=pr549, our step at the per-rank shape"),
    "train_sp8192": (lambda p: train_ours(p, "sp8192"),
                     "PRESET=sp8192, our step at the per-rank shape, unlooped and looped"),
    "train_theirs": (train_theirs, "PR #549's record script, its step at the same shape"),
    "eval_pr549": (eval_pr549, "PRESET=pr549 evaluation: sliding windows and chunk TTT, as rank 0 of 8"),
    "lora_sp8192": (lora_sp8192, "PRESET=sp8192 LoRA TTT with its pauses, as rank 0 of 8"),
    "quant_pr549": (lambda p: quant(p, "pr549"), "PRESET=pr549 Hessians, GPTQ and the cap fit at full size"),
    "quant_sp8192": (lambda p: quant(p, "sp8192"),
                     "PRESET=sp8192 Hessians, GPTQ and the cap fit at full size"),
}


def run_part(name: str, work: Path | None, dry: bool, compile_: bool):
    if dry:
        torch.set_num_threads(1)  # the parts share the CPUs
    PARTS[name][0](Part(name, work, dry, compile_))


# ---------------------------------------------------------------------------------------------------------
# The parent: starts every part, lets each time alone, writes the report after each
# ---------------------------------------------------------------------------------------------------------

RESERVE_PER_PART = 45  # seconds kept for each ready part's timing: past that, no more waiting on compiles


def schedule(names: list[str], work: Path, args, deadline: float, write) -> dict[str, str]:
    """Starts the parts; when none is compiling (or time is short), tells the first ready one to go and
    waits for it; returns each part's outcome."""
    flags = ["--dry-run"] * args.dry_run + ["--compile"] * args.compile
    procs, logs = {}, {n: open(work / f"{n}.log", "a") for n in names}
    for n in names:
        for stale in (".ready", ".go", ".json"):
            (work / f"{n}{stale}").unlink(missing_ok=True)
        procs[n] = subprocess.Popen([sys.executable, __file__, "--part", n, "--work", str(work), *flags],
                                    cwd=work, stdout=logs[n], stderr=subprocess.STDOUT,
                                    env=os.environ | {"PYTHONUNBUFFERED": "1"})
    status, pending = {}, list(names)
    while pending and time.monotonic() < deadline:
        ready = [n for n in pending if (work / f"{n}.ready").exists()]
        for n in [n for n in pending if n not in ready and procs[n].poll() is not None]:
            rc = procs[n].returncode
            status[n] = "skipped: nothing to time" if rc == 0 else f"died before its turn (exit {rc})"
            pending.remove(n)
        compiling = [n for n in pending if n not in ready]
        left = deadline - time.monotonic()
        if not ready or (compiling and left > RESERVE_PER_PART * len(ready)):
            time.sleep(0.2)
            continue
        n = ready[0]
        (work / "go.tmp").write_text(", ".join(compiling))
        (work / "go.tmp").rename(work / f"{n}.go")  # whole, or not there
        try:
            rc = procs[n].wait(timeout=max(1.0, min(TIMED_LIMIT, left)))
            status[n] = "done" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            procs[n].kill()
            status[n] = f"killed: still timing after {min(TIMED_LIMIT, left):.0f} s"
        pending.remove(n)
        write(status)
    for n in pending:
        procs[n].kill()
        status[n] = "not timed: out of time"
    for n, p in procs.items():
        p.wait()
        logs[n].close()
    return status


def device_facts(dry: bool) -> dict:
    facts = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    if not torch.cuda.is_available():
        return facts | {"device": "CPU" + " (dry run)" * dry, "slug": "cpu_dry_run" if dry else "cpu"}
    name = torch.cuda.get_device_name(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    slug = next((k.lower() for k in ("H100", "H200", "A100", "B200") if k in name), "gpu")
    return facts | {"device": name, "slug": slug, "driver, memory": smi, "CUDA": torch.version.cuda,
                    "cuDNN": torch.backends.cudnn.version()}


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


PROJECTIONS = (("train_pr549", "steps in"), ("train_sp8192", "steps in"), ("eval_pr549", "sliding, full"),
               ("eval_pr549", "chunk TTT, full"), ("lora_sp8192", "LoRA TTT, full"),
               ("quant_pr549", "calibration + solve"), ("quant_sp8192", "calibration + solve"))


def render(names: list[str], status: dict, work: Path, facts: dict, args, wall: float) -> str:
    rows = {n: json.loads(read(work / f"{n}.json") or "[]") for n in names}
    head = [f"# GPU check: {facts['device']}, {datetime.date.today()}", "",
            "; ".join(f"{k} {v}" for k, v in facts.items() if k not in ("device", "slug")) + ".",
            f"Command: `python3 tests/benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` ({wall:.0f} s "
            f"wall, budget {args.budget:.0f} s). Each part is one process: all compile at once, then each "
            f"is timed alone."]
    ours, theirs = (next((v.split(";")[0] for k, v in rows.get(n, []) if k.startswith("plain step ms")), None)
                    for n in ("train_pr549", "train_theirs"))
    if ours and theirs:
        head.append(f"\n**ours/theirs (PR #549's record script), per-rank step: "
                    f"{float(ours) / float(theirs):.3f}** ({float(ours):.2f} ms / {float(theirs):.2f} ms)")
    projected = [f"- {n}: {k}: {v}" for n, start in PROJECTIONS
                 for k, v in rows.get(n, []) if k.startswith(start)]
    body = ["", "## Projections to 8xH100 (600 s of training, 600 s of evaluation)", "", *projected]
    for n in names:
        body += ["", f"## {n}: {PARTS[n][1]}", "", f"Outcome: {status.get(n, 'not run')}.", "",
                 "| measure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows[n])]
    caveats = ["", "## Caveats", "",
               "- One GPU: the 8-GPU numbers leave out the collectives (gradient reduce-scatter/all-gather,"
               " TTT all-reduces), and evaluation parts run rank 0's share of an 8-rank pass.",
               "- Random tokens (validation lengths from data/sample for LoRA TTT); untrained weights"
               " (output projections drawn at std 0.02) for GPTQ and the codecs, whose bytes differ from a"
               " trained model's.",
               "- A step is forward, backward and the optimizers, for both scripts; the EMA update both"
               " runs also make each step is left out of both.",
               "- Compile times were taken with every part compiling at once on the same CPUs."]
    caveats += {"h200": ["- An H200 has the H100's bf16 peak (989 TFLOP/s dense) and ~1.4x its memory"
                         " bandwidth: memory-bound kernels run faster here than on the competition's H100s."],
                "cpu_dry_run": ["- A dry run: tiny shapes on the CPU. It shows that every part runs and which"
                                " graphs compile; its times and projections say nothing about a GPU."]
                }.get(facts["slug"], [])
    return "\n".join(head + body + caveats) + "\n"


def check_all(args):
    names = args.parts or list(PARTS)
    facts = device_facts(args.dry_run)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out = Path(args.out_dir or (work if args.dry_run else ROOT / "tests/benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{facts['slug']}_{datetime.date.today()}"
    t0 = time.monotonic()
    deadline = t0 + args.budget

    def write(status):
        (stem.with_suffix(".md")).write_text(render(names, status, work, facts, args, time.monotonic() - t0))
        logs = (f"===== {n} =====\n{read(work / f'{n}.log')[-20000:]}\n" for n in names)
        Path(f"{stem}_logs.txt").write_text("".join(logs))

    status = schedule(names, work, args, deadline, write)
    oom = [n for n in names if status[n].startswith("died") and "out of memory" in read(work / f"{n}.log")]
    for n in oom:  # once more, alone
        status |= schedule([n], work, args, deadline, lambda s: write(status | s))
    write(status)
    print((stem.with_suffix(".md")).read_text())
    print(f"report: {stem.with_suffix('.md')}\nlogs: {stem}_logs.txt")
    return 0 if all(s == "done" or s.startswith("skipped") for s in status.values()) else 1


def prepare(checkout: str):
    """Copies PR #549's record script (checked by its sha256) and downloads the wheels the device lacks."""
    src = Path(checkout) / PR549_RECORD
    if not src.is_file():
        sys.exit(f"{src}: no such file (give a checkout of openai/parameter-golf)")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if digest != PR549_SHA256:
        sys.exit(f"{src}: sha256 {digest}, not PR #549's record script ({PR549_SHA256})")
    (PREPARED / "pr549").mkdir(parents=True, exist_ok=True)
    shutil.copy(src, PREPARED / "pr549" / "train_gpt.py")
    for pkg in WHEELS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        *(f"--platform={p}" for p in PLATFORMS), "-d", str(PREPARED / "wheels"),
                        f"{pkg}=={importlib.metadata.version(pkg)}"], check=True)
    for f in sorted(PREPARED.rglob("*.*")):
        print(f"{f.stat().st_size:>10,}  {f.relative_to(ROOT)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", metavar="CHECKOUT", help="an openai/parameter-golf checkout")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, eager unless --compile (CPU)")
    ap.add_argument("--compile", action="store_true", help="with --dry-run: compile as on a GPU")
    ap.add_argument("--out-dir", help="default: tests/benchmarks/results (a dry run: its work folder)")
    ap.add_argument("--budget", type=float, default=510.0, help="seconds for the whole check")
    ap.add_argument("--parts", nargs="+", choices=PARTS, help="default: all, in this order")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a part's own process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        return prepare(a.prepare)
    if a.part:
        try:
            return run_part(a.part, a.work, a.dry_run, a.compile)
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
    sys.exit(check_all(a))


if __name__ == "__main__":
    main()
