"""Benchmark of train_gpt.py's stages on whatever device it runs on (not collected by pytest).

    python tests/benchmarks/bench.py [--seqs 48] [--steps 10] [--out results/<device>_<date>.md]

Measures the competition's per-rank training step (48 x 2048 tokens: forward, backward, optimizer),
tokens/s, model FLOPs utilization, peak memory; sliding-window eval throughput; one TTT chunk;
Hessian collection, GPTQ solve, the artifact's per-group packing and each codec alone. Projects the
8xH100 budgets from these numbers.
Model shape comes from the usual env vars (defaults = the record configuration).
"""
import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import train_gpt as tg  # noqa: E402

VAL_TARGETS = 62_021_632  # scored positions of the challenge's validation split
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


class RandomLoader:
    def __init__(self, vocab, device):
        self.vocab, self.device = vocab, device

    def next_batch(self, local, seq_len):
        x = torch.randint(0, self.vocab, (local // seq_len, seq_len + 1), device=self.device)
        return x[:, :-1], x[:, 1:]


def timed(ctx, fn, reps=1):
    fn()  # warm-up (compilation)
    ctx.sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    ctx.sync()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=48, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    h = tg.Hyperparameters()
    ctx = tg.Context(h)
    backend = tg.set_attention_backend(ctx.device)
    if ctx.cuda and backend == "sdpa":
        backend += f" ({tg.pin_sdpa_kernels(h)})"
    L, V = h.TRAIN_SEQ_LEN, h.VOCAB_SIZE
    ctx.grad_accum = 1  # one micro-batch of --seqs sequences = the 8-GPU per-rank step
    h.TRAIN_BATCH_TOKENS = a.seqs * L * ctx.world
    model = tg.build_model(h, ctx)
    with torch.no_grad():  # trained-looking weights: non-zero output projections
        model.qo_bank[h.NUM_LAYERS:].normal_(std=0.02)
        model.mlp_down_bank.normal_(std=0.02)
    model_c = tg.compile_model(model, ctx)
    opt, loader = tg.Optimizers(model, h, ctx.world), RandomLoader(V, ctx.device)
    rows = []
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(ctx, lambda: tg.train_step(model_c, loader, opt, h, ctx, 100, 1.0, h.TRAIN_SEQ_LEN), a.steps)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = a.seqs * L
    d, nl = h.MODEL_DIM, h.NUM_LAYERS
    flops = 6 * tokens * (n_params - V * d) + 6 * tokens * V * d + 12 * nl * a.seqs * L * L * d / 2  # causal attn
    name = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    rows += [("train step (ms)", f"{1000 * step_s:.1f}"), ("tokens/s per rank", f"{tokens / step_s:,.0f}"),
             ("model TFLOP/s", f"{flops / step_s / 1e12:.1f}"),
             ("MFU", f"{100 * flops / step_s / 1e12 / peak:.1f}%" if peak else "n/a")]
    if ctx.cuda:
        rows.append(("peak memory (MiB)", f"{torch.cuda.max_memory_allocated() // 2**20}"))
    budget = h.MAX_WALLCLOCK_SECONDS - h.GPTQ_RESERVE_SECONDS
    rows.append((f"steps in {budget:.0f} s (8 GPUs, same per-rank step)", f"{budget / step_s:,.0f}"))
    # sliding eval: windows/s for full windows, stride EVAL_STRIDE
    W = h.EVAL_SEQ_LEN
    val = torch.randint(0, V, (a.eval_windows * h.EVAL_STRIDE + W + 1,), device=ctx.device)
    model.eval()
    val_bytes = torch.ones_like(val, dtype=torch.int32)  # one byte per token: the rates, not the bpb, matter
    sl_s = timed(ctx, lambda: tg.eval_val_sliding(model_c, val, h, ctx, val_bytes))
    n_win = len(tg.sliding_windows(val.numel() - 1, W, h.EVAL_STRIDE))
    total_win = VAL_TARGETS // h.EVAL_STRIDE
    rows += [("sliding eval (windows/s)", f"{n_win / sl_s:,.0f}"),
             ("full-val sliding on 8 GPUs (s)", f"{total_win / (n_win / sl_s) / 8:.1f}")]
    # one TTT chunk: score its windows, then TTT_EPOCHS of training on it
    state = tg.chunk_ttt_state(model, h, ctx)
    C = h.TTT_CHUNK_TOKENS
    chunk = torch.randint(0, V, (C + W + 1,), device=ctx.device)
    wins, chunk_bytes = tg.sliding_windows(C, W, h.EVAL_STRIDE), torch.ones_like(chunk, dtype=torch.int32)
    def ttt_chunk():
        tg.score_windows(model_c, chunk, wins, h, ctx, chunk_bytes, tg.BpbMeter(ctx.device), None)
        model.train()
        tg.ttt_train_chunk(model_c, state, chunk, 0, C, h.TTT_LR, h, ctx)
        model.eval()
    ttt_s = timed(ctx, ttt_chunk)
    n_chunks = -(-VAL_TARGETS // C)
    rows += [("one TTT chunk, 1 GPU (s)", f"{ttt_s:.2f}"),
             ("full-val TTT on 8 GPUs (s, if chunk work splits 8 ways)", f"{ttt_s * n_chunks / 8:.1f}")]
    # Hessians, GPTQ, compression
    h.GPTQ_CALIB_BATCHES, h.MAX_WALLCLOCK_SECONDS = 4, 0
    clock = tg.Clock(ctx)
    clock.start()
    t = time.perf_counter()
    with tg.fp32_matmuls():
        hess = tg.collect_hessians(model, loader, h, ctx, clock, tg.Budget(h))
        rows.append(("Hessians, 4 batches (s)", f"{time.perf_counter() - t:.2f}"))
        t = time.perf_counter()
        entries = tg.quantize_state(model, hess, h, ctx)
        ctx.sync()
    rows.append(("GPTQ solve, all matrices (s)", f"{time.perf_counter() - t:.2f}"))
    # the artifact's per-group packing (every codec x transform per group, in threads), then each codec alone
    # on every group (with the transform the full search chose), as a plan: its time and size
    config = tg.model_config(h)
    t = time.perf_counter()
    blob, report = tg.pack(entries, config, {})
    rows.append(("pack, best codec x transform per group (s / bytes, untrained weights)",
                 f"{time.perf_counter() - t:.2f} / {len(blob):,}"))
    for codec in tg.available_codecs():
        plan = {g: dict(r, codec=codec) for g, r in report.items()}
        t = time.perf_counter()
        n = len(tg.pack(entries, config, {}, plan)[0])
        rows.append((f"compress {codec} (s / bytes, every group, untrained weights)", f"{time.perf_counter() - t:.2f} / {n:,}"))
    rows.append(("per-group choice (codec/transform: bytes)",
                 " ".join(f"{g}={r['codec']}/{r['transform']}: {r['bytes']:,}" for g, r in report.items())))
    head = [f"# train_gpt.py benchmark: {name}, {datetime.date.today()}",
            f"attention backend: {backend}; torch {torch.__version__}; per-rank batch {a.seqs}x{L}; "
            f"params {n_params:,}", "", "| measure | value |", "| --- | --- |"]
    text = "\n".join(head + [f"| {k} | {v} |" for k, v in rows]) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
