"""Quantize/pack: GPTQ int6 and int8 rows, the lossless artifact format, byte-capped fitting, calibration."""
import copy
import os
import re
import struct

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, FakeCtx as Ctx, random_model, run_script, tiny_env




class RandomLoader:
    """next_batch like DistributedTokenLoader, on seeded random tokens; counts calls."""

    def __init__(self, vocab: int, seed: int = 0, clock=None, cost_ms: float = 0.0):
        self.vocab, self.g, self.calls, self.clock, self.cost_ms = vocab, torch.Generator().manual_seed(seed), 0, clock, cost_ms

    def next_batch(self, local: int, seq_len: int):
        self.calls += 1
        if self.clock is not None:
            self.clock.t += self.cost_ms
        t = torch.randint(0, self.vocab, (local + 1,), generator=self.g)
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def ms(self) -> float:
        return self.t

    synced_ms = ms


def hparams(**over) -> tg.Hyperparameters:
    # VOCAB_SIZE 4096 x MODEL_DIM 32 > PASSTHROUGH_MAX, so the tied embedding takes the int8 path.
    return tg.Hyperparameters(tiny_env("unused.model", "unused", **{"VOCAB_SIZE": 4096, **over}))


def config_of(h):
    return tg.model_config(h)


@pytest.fixture(scope="module")
def quantized():
    """(h, model, hessians, entries) for a 3-layer model calibrated on random tokens."""
    h = hparams(GPTQ_CALIB_BATCHES=2)
    model = random_model(h, noise=0.05)
    ctx = Ctx()
    clock = tg.Clock(ctx)
    clock.start()
    hess = tg.collect_hessians(model, RandomLoader(h.VOCAB_SIZE), h, ctx, clock)
    entries = tg.quantize_state(model, hess, h, ctx)
    return h, model, hess, entries


def assert_entries_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        ea, eb = a[name], b[name]
        assert ea["kind"] == eb["kind"], name
        if ea["kind"] == "fp16":
            assert eb["data"].dtype == torch.float16 and eb["data"].shape == ea["data"].shape, name
            assert torch.equal(ea["data"].view(torch.int16), eb["data"].view(torch.int16)), name  # bitwise
        else:
            assert eb["q"].dtype == torch.int8 and eb["q"].shape == ea["q"].shape, name
            assert eb["scale"].dtype == torch.float16 and eb["scale"].shape == ea["scale"].shape, name
            assert torch.equal(ea["q"], eb["q"]), name
            assert torch.equal(ea["scale"].view(torch.int16), eb["scale"].view(torch.int16)), name


@pytest.fixture(scope="module")
def fit_entries(quantized):
    """The int6 block matrices, small fp16 tensors and one small int8 matrix: quick to compress many times."""
    h, _, hess, entries = quantized
    out = {k: v for k, v in entries.items() if k not in ("tok_emb.weight", "ve_shared.embed.weight")}
    q, s = tg.quantize_rows(torch.randn(64, 32, generator=torch.Generator().manual_seed(9)), 127)
    out["extra.weight"] = {"kind": "int8", "q": q, "scale": s}
    return h, hess, out


def count_pm1(entries) -> int:
    return sum(int((e["q"].abs() == 1).sum()) for e in entries.values() if e["kind"] == "int6")


# ---------------------------------------------------------------- routing and lossless packing

def test_quantize_state_routes_every_tensor(quantized):
    """Bank matrices -> int6 (GPTQ), large other matrices -> int8 rows, everything else -> fp16, shapes kept."""
    h, model, _, entries = quantized
    flat = tg.unbank(model.state_dict(), h.NUM_LAYERS)
    assert sorted(entries) == sorted(flat)
    banked = {f"blocks.{i}.{slot}.weight" for i in range(h.NUM_LAYERS) for slot, _, _, _ in tg.BANK_SLOTS}
    for name, t in flat.items():
        e = entries[name]
        want = "int6" if name in banked else "int8" if t.dim() == 2 and t.numel() > tg.PASSTHROUGH_MAX else "fp16"
        assert e["kind"] == want, name
        if want == "fp16":
            assert e["data"].dtype == torch.float16 and e["data"].shape == t.shape
        else:
            assert e["q"].dtype == torch.int8 and e["q"].shape == t.shape and e["scale"].shape == (t.size(0),)
    assert {e["kind"] for e in entries.values()} == {"int6", "int8", "fp16"}
    assert any(e["kind"] == "fp16" and e["data"].dim() == 0 for e in entries.values())  # 0-d scalars too


@pytest.mark.parametrize("layout", tg.LAYOUTS)
def test_serialize_roundtrip_is_bit_exact(quantized, layout):
    """serialize/deserialize returns every code, scale and fp16 tensor bit-identical, with kinds and shapes."""
    h, _, _, entries = quantized
    meta = {"prequant_val_bpb": 1.234567891234, "seed": 7}
    config, meta2, out = tg.deserialize(tg.serialize(entries, config_of(h), meta, layout))
    assert config == config_of(h) and meta2 == meta
    assert_entries_identical(entries, out)


@pytest.mark.parametrize("layout", tg.LAYOUTS)
@pytest.mark.parametrize("codec", tg.CODECS)
def test_pack_read_artifact_roundtrip(quantized, tmp_path, codec, layout):
    """pack -> file -> read_artifact is lossless for every available codec and layout."""
    if codec not in tg.available_codecs():
        pytest.skip(f"{codec} not installed")
    h, _, _, entries = quantized
    blob = tg.pack(tg.serialize(entries, config_of(h), {"a": 1}, layout), codec)
    assert blob[:len(tg.ARTIFACT_MAGIC)] == tg.ARTIFACT_MAGIC and tg.CODECS[blob[len(tg.ARTIFACT_MAGIC) + 1]] == codec
    path = tmp_path / "m.ptz"
    tg.write_atomic(str(path), blob)
    config, meta, out = tg.read_artifact(str(path))
    assert config == config_of(h) and meta == {"a": 1}
    assert_entries_identical(entries, out)


def test_artifact_pins_the_trained_rope_base(quantized, tmp_path):
    """A model trained at 2048 tokens (ntk1024 stretch) reloads with its base, whatever TRAIN_SEQ_LEN the
    evaluating process has: the artifact stores the resolved base, not the rule."""
    h, _, _, entries = quantized
    trained = copy.copy(h)
    trained.update({"TRAIN_SEQ_LEN": 2048})  # ROPE_DIMS 4: base 10000 * 2^(4/2)
    assert trained.rope_base == 40000.0 and h.rope_base == 10000.0
    path = tmp_path / "m.ptz"
    tg.write_atomic(str(path), tg.pack(tg.serialize(entries, config_of(trained), {}, "row"), "lzma"))
    trained_inv_freq = tg.GPT(trained).rotary.inv_freq
    for seq_len in (32, 4096):
        evaluating = hparams(TRAIN_SEQ_LEN=seq_len)
        model, _ = tg.load_eval_model(str(path), evaluating, Ctx())
        assert evaluating.rope_base == 40000.0
        assert torch.equal(model.rotary.inv_freq, trained_inv_freq)


def test_all_three_codecs_are_available():
    """The record environment has lzma, zstd and brotli, so compress_best really compares three codecs."""
    assert tg.available_codecs() == list(tg.CODECS)


def test_dequantized_state_loads_strictly_and_stays_close(quantized, tmp_path):
    """dequantize_state + rebank gives the model's state_dict shapes, loads strict=True and predicts alike."""
    h, model, _, entries = quantized
    path = tmp_path / "m.ptz"
    tg.write_atomic(str(path), tg.pack(tg.serialize(entries, config_of(h), {}, "col"), "lzma"))
    _, _, read = tg.read_artifact(str(path))
    state = tg.dequantize_state(read, h.NUM_LAYERS)
    ref = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    fresh = tg.GPT(h)
    fresh.load_state_dict(state, strict=True)
    for k, v in ref.items():
        rel = (fresh.state_dict()[k] - v).norm() / v.norm().clamp_min(1e-12)
        assert rel < 0.1, (k, float(rel))
    ids = torch.randint(0, h.VOCAB_SIZE, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids[:, :-1], ids[:, 1:]).mean(), fresh.eval()(ids[:, :-1], ids[:, 1:]).mean()
    assert torch.isfinite(b) and abs(float(a - b)) < 0.05 * float(a)


def test_one_layer_model_roundtrips(tmp_path):
    """NUM_LAYERS=1 (zero-row skip_weights) still packs, reads back and loads strictly."""
    h = hparams(NUM_LAYERS=1, XSA_LAST_N=1, VE_LAYERS="0")
    model = random_model(h, noise=0.05)
    entries = tg.quantize_state(model, {}, h, Ctx())
    path = tmp_path / "m.ptz"
    tg.write_atomic(str(path), tg.pack(tg.serialize(entries, config_of(h), {}, "row"), "lzma"))
    _, _, read = tg.read_artifact(str(path))
    assert_entries_identical(entries, read)
    tg.GPT(h).load_state_dict(tg.dequantize_state(read, 1), strict=True)


# ---------------------------------------------------------------- code ranges and GPTQ quality

def correlated_hessian(cols: int, seed: int = 0, n: int = 4096) -> torch.Tensor:
    """X = Z A (strongly correlated columns) + small noise, a few columns with 20x variance; H = X^T X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 12, generator=g) @ torch.randn(12, cols, generator=g) + 0.05 * torch.randn(n, cols, generator=g)
    X[:, :4] *= 20
    return X.T @ X


def test_codes_stay_in_range_even_with_huge_outliers(quantized):
    """int6 codes stay in [-31, 31] and int8 codes in [-127, 127], also on rows with 1000x outliers."""
    _, _, _, entries = quantized
    for name, e in entries.items():
        if e["kind"] != "fp16":
            lim = 31 if e["kind"] == "int6" else 127
            assert int(e["q"].abs().max()) <= lim, name
            assert torch.isfinite(e["scale"]).all() and (e["scale"] > 0).all(), name
    g = torch.Generator().manual_seed(3)
    W = 0.02 * torch.randn(24, 64, generator=g)
    W[::3, 5] = 30.0
    W[1::3, 40] = -25.0
    H = correlated_hessian(64)
    for q, s in (tg.gptq_quantize(W, H), tg.gptq_quantize(W, None), tg.gptq_quantize(W, H, block=16)):
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 31
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.isfinite(q.float() * s.float()[:, None]).all()
    q, s = tg.quantize_rows(W, 127)
    assert int(q.abs().max()) <= 127 and (s > 0).all()


def test_zero_and_tiny_rows_get_a_positive_scale():
    """A zero row quantizes to zeros and a tiny row keeps a positive fp16 scale (1e-8 floor must survive .half())
    and is reconstructed far better than by dropping it."""
    W = torch.zeros(3, 16)
    W[1] = 2e-7 * torch.linspace(-1, 1, 16)
    W[2] = torch.linspace(-1, 1, 16)
    H = correlated_hessian(16)
    for weight, (q, s) in ((torch.eye(16), tg.gptq_quantize(W, None)), (H, tg.gptq_quantize(W, H)),
                           (torch.eye(16), tg.quantize_rows(W, 127))):
        assert (s > 0).all(), s
        assert torch.equal(q[0], torch.zeros_like(q[0]))
        d = (W[1] - q[1].float() * s[1].float()).double()
        err, dropped = d @ weight.double() @ d, W[1].double() @ weight.double() @ W[1].double()
        assert err <= 0.25 * dropped, (float(err), float(dropped))


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    """Hessian-weighted error tr((W-Q)H(W-Q)^T) of GPTQ is clearly below RTN with the same clip candidates."""
    H = correlated_hessian(96)
    W = 0.05 * torch.randn(48, 96, generator=torch.Generator().manual_seed(1))

    def err(q, s):
        D = (W - q.float() * s.float()[:, None]).double()
        return float(torch.einsum("rc,cd,rd->", D, H.double(), D))

    e_gptq, e_rtn = err(*tg.gptq_quantize(W, H)), err(*tg.gptq_quantize(W, None))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    e_small_blocks = err(*tg.gptq_quantize(W, H, block=16))  # lazy-batch blocking changes nothing essential
    assert e_small_blocks < 0.8 * e_rtn


def reference_rtn(W: torch.Tensor, qmax: int, weights: torch.Tensor | None = None):
    """Independent per-row round-to-nearest: every clip quantile, fp16 scale, least (weighted) squared error."""
    weights = torch.ones(W.size(1)) if weights is None else weights
    qs, ss = [], []
    for row in W.float():
        best = None
        for qt in tg.CLIP_QUANTILES:
            clip = row.abs().max() if qt == 1.0 else torch.quantile(row.abs(), qt)
            s = (clip / qmax).clamp_min(1e-8).half().float()
            q = torch.clamp(torch.round(row / s), -qmax, qmax)
            e = float((weights.double() * (row - q * s).double() ** 2).sum())
            if best is None or e < best[0]:
                best = (e, q, s)
        qs.append(best[1])
        ss.append(best[2])
    return torch.stack(qs).to(torch.int8), torch.stack(ss).half()


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """gptq_quantize(W, I) == gptq_quantize(W, None) == an independent per-row RTN, exactly."""
    W = torch.randn(20, 48, generator=torch.Generator().manual_seed(2))
    W[3, 7] = 9.0  # an outlier row, where a clipped candidate can win
    q0, s0 = tg.gptq_quantize(W, None)
    q1, s1 = tg.gptq_quantize(W, torch.eye(48))
    qr, sr = reference_rtn(W, 31)
    assert torch.equal(q0, q1) and torch.equal(s0, s1)
    assert torch.equal(q0, qr) and torch.equal(s0, sr)
    q8, s8 = tg.quantize_rows(W, 127)
    qr8, sr8 = reference_rtn(W, 127)
    assert torch.equal(q8, qr8) and torch.equal(s8, sr8)


def test_gptq_with_diagonal_hessian_rounds_and_unpermutes():
    """A diagonal H has no cross-column feedback: codes are RTN, candidates chosen by diag-weighted error,
    and act-order's column permutation is undone."""
    W = torch.randn(20, 48, generator=torch.Generator().manual_seed(4))
    d = torch.rand(48, generator=torch.Generator().manual_seed(5)) * 10 + 0.1
    q, s = tg.gptq_quantize(W, torch.diag(d))
    qr, sr = reference_rtn(W, 31, d)
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_dead_hessian_columns_are_zeroed():
    """Columns never seen in calibration (H_jj = 0) quantize to code 0 without NaNs."""
    H = correlated_hessian(32)
    H[:, 9] = 0
    H[9, :] = 0
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    q, s = tg.gptq_quantize(W, H)
    assert torch.equal(q[:, 9], torch.zeros(8, dtype=torch.int8)) and torch.isfinite(s).all()
    assert (q[:, :9] != 0).any()


# ---------------------------------------------------------------- byte cap

def test_fit_artifact_under_the_cap_returns_the_smallest_blob(quantized, tmp_path):
    """Comfortably under the cap: the blob is the smallest (codec, layout) packing, unpruned, and its length
    is what write_atomic puts on disk."""
    h, _, _, entries = quantized
    ctx = Ctx()
    config, meta = config_of(h), {"m": 1}
    blob = tg.fit_artifact(entries, config, meta, 1000, 10**9, ctx)
    candidates = [tg.pack(tg.serialize(entries, config, meta, lay), c) for c in tg.available_codecs() for lay in tg.LAYOUTS]
    assert len(blob) == min(map(len, candidates)) and blob in candidates
    assert not any(m.startswith("size_fit") for m in ctx.logs)
    path = tmp_path / "final.ptz"
    tg.write_atomic(str(path), blob)
    assert os.path.getsize(path) == len(blob) and os.listdir(tmp_path) == ["final.ptz"]
    assert_entries_identical(entries, tg.read_artifact(str(path))[2])


def test_pack_artifact_logs_the_bytes_on_disk(quantized, tmp_path, monkeypatch):
    """The logged serialized/code/total byte counts equal the artifact's and train_gpt.py's file sizes."""
    h, _, _, entries = quantized
    monkeypatch.chdir(tmp_path)
    h = copy.copy(h)
    h.ARTIFACT_PATH = "out.ptz"
    ctx = Ctx(master=True)
    assert tg.pack_artifact(entries, h, ctx, {"seed": 7}) == "out.ptz"
    log = "\n".join(ctx.logs)
    art, code = os.path.getsize(tmp_path / "out.ptz"), os.path.getsize(ROOT / "train_gpt.py")
    assert int(re.search(r"^Serialized model int6\+\w+: (\d+) bytes", log, re.M).group(1)) == art
    assert int(re.search(r"^Code size: (\d+) bytes", log, re.M).group(1)) == code
    assert int(re.search(r"^Total submission size int6\+\w+: (\d+) bytes", log, re.M).group(1)) == art + code
    assert sorted(os.listdir(tmp_path)) == ["out.ptz"]


def _decompress(blob: bytes) -> bytes:
    head = len(tg.ARTIFACT_MAGIC)
    return tg._codec(tg.CODECS[blob[head + 1]])[1](blob[head + 6:])


def sizes_for_pruning(entries, config, meta):
    """(unpruned best size, fully pruned size) with the codec/layout fit_artifact keeps."""
    blob, codec, layout = tg.compress_best(entries, config, meta, Ctx())
    order = tg.prune_order(entries)
    full = len(tg.pack(tg.serialize(tg.pruned(entries, order, len(order)), config, meta, layout), codec))
    return len(blob), full


def test_over_cap_prunes_cheapest_pm1_codes_until_it_fits(fit_entries):
    """Between 'all +-1 pruned' and 'unpruned': the blob fits, only +-1 codes became 0, the cheapest ones
    (scale^2 * H_jj) went first, and the result is deterministic."""
    h, hess, entries = fit_entries
    config, meta, code = config_of(h), {}, 5000
    best, full = sizes_for_pruning(entries, config, meta)
    assert full < best - 50, (full, best)
    cap = code + (best + full) // 2
    ctx = Ctx()
    blob = tg.fit_artifact(entries, config, meta, code, cap, ctx)
    assert code + len(blob) <= cap
    assert any(m.startswith("size_fit: over by") for m in ctx.logs) and any(m.startswith("size_fit: pruned") for m in ctx.logs)
    assert blob == tg.fit_artifact(entries, config, meta, code, cap, Ctx())
    _, _, out = tg.deserialize(_decompress(blob))
    assert count_pm1(out) < count_pm1(entries)
    pruned_costs, kept_costs = [], []
    for name, e in entries.items():
        if e["kind"] == "fp16":
            assert torch.equal(e["data"].view(torch.int16), out[name]["data"].view(torch.int16))
            continue
        assert torch.equal(e["scale"].view(torch.int16), out[name]["scale"].view(torch.int16))
        changed = e["q"] != out[name]["q"]
        assert e["kind"] == "int6" or not changed.any(), name
        assert (e["q"][changed].abs() == 1).all() and (out[name]["q"][changed] == 0).all(), name
        if e["kind"] == "int6":
            layer, slot = re.match(r"blocks\.(\d+)\.(\w+\.\w+)\.weight", name).groups()
            key = {"attn.c_q": "attn.qkv", "attn.c_k": "attn.qkv", "attn.c_v": "attn.qkv"}.get(slot, slot)
            cost = e["scale"].float()[:, None] ** 2 * hess[f"blocks.{layer}.{key}"].diagonal()[None, :]
            pm1 = e["q"].abs() == 1
            pruned_costs.append(cost[pm1 & changed])
            kept_costs.append(cost[pm1 & ~changed])
    assert torch.cat(pruned_costs).max() <= torch.cat(kept_costs).min()


def test_cap_below_fully_pruned_size_raises_saying_how_far_over(fit_entries):
    """A cap below even the fully pruned size raises RuntimeError naming the bytes over."""
    h, _, entries = fit_entries
    config, code = config_of(h), 5000
    _, full = sizes_for_pruning(entries, config, {})
    with pytest.raises(RuntimeError, match=r"artifact does not fit: 10 bytes over"):
        tg.fit_artifact(entries, config, {}, code, code + full - 10, Ctx())


def test_size_cap_end_to_end(tiny_tokenizer, tiny_data, tmp_path):
    """Subprocess: an impossible SIZE_CAP_BYTES exits non-zero saying 'bytes over'; a cap between the pruned
    and unpruned sizes logs size_fit lines and writes code + artifact <= cap."""
    code = os.path.getsize(ROOT / "train_gpt.py")
    base = dict(ITERATIONS=8, TTT_ENABLED=0, EVAL_STRIDE=16)
    cap = code + 2000
    (tmp_path / "a").mkdir()
    r = run_script(tmp_path / "a", tiny_env(tiny_tokenizer, tiny_data, SIZE_CAP_BYTES=cap, **base), timeout=180)
    assert r.returncode != 0 and "bytes over" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "a" / "final_model.int6.ptz").exists()
    m = re.search(r"does not fit: (\d+) bytes over the (\d+)-byte cap even with every \+-1 code pruned \((\d+) over", r.stderr)
    full, best = int(m.group(1)) + cap - code, int(m.group(3)) + cap - code
    assert full < best
    cap2 = code + (full + best) // 2
    (tmp_path / "b").mkdir()
    r = run_script(tmp_path / "b", tiny_env(tiny_tokenizer, tiny_data, SIZE_CAP_BYTES=cap2, **base), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "b" / "logs" / "tiny.txt").read_text()
    assert re.search(r"^size_fit: over by \d+ bytes", log, re.M) and re.search(r"^size_fit: pruned \d+/\d+", log, re.M)
    total = int(re.search(r"^Total submission size int6\+\w+: (\d+) bytes", log, re.M).group(1))
    assert total == os.path.getsize(tmp_path / "b" / "final_model.int6.ptz") + code <= cap2
    assert re.search(r"^final_int6_sliding_window_exact ", log, re.M)  # the pruned artifact loads and evaluates


# ---------------------------------------------------------------- corrupt artifacts

def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1:]


def corruptions(good: bytes, payload: bytes, codec: str):
    head = len(tg.ARTIFACT_MAGIC) + 6
    return {
        "bad magic": (b"NOTPG" + good[5:], "magic"),
        "empty file": (b"", "magic"),
        "truncated header": (good[:head - 2], "truncated"),
        "wrong version": (good[:5] + bytes([tg.ARTIFACT_VERSION + 1]) + good[6:], "version"),
        "unknown codec": (good[:6] + bytes([len(tg.CODECS)]) + good[7:], "codec"),
        "truncated body": (good[:head + (len(good) - head) // 2], "corrupt"),
        "flipped body byte": (_flip(good, head + (len(good) - head) // 2), "corrupt"),
        "flipped last byte": (_flip(good, len(good) - 1), "corrupt"),
        "flipped checksum": (_flip(good, 8), "corrupt"),
        "tensor data shorter than header": (tg.pack(payload[:-10], codec), "corrupt"),
        "trailing bytes": (tg.pack(payload + b"\0\0", codec), "corrupt"),
    }


def inconsistent_payloads(payload: bytes, codec: str):
    """Well-packed (valid checksum) payloads whose own header is inconsistent with their length."""
    return {
        "header length past the end": (tg.pack(struct.pack("<I", len(payload) + 100) + payload[4:], codec), "corrupt"),
        "payload shorter than its length field": (tg.pack(b"\x01", codec), "corrupt"),
    }


def check_refused(tmp_path, cases: dict) -> list[str]:
    failures = []
    for case, (blob, word) in cases.items():
        path = tmp_path / "bad.ptz"
        path.write_bytes(blob)
        try:
            tg.read_artifact(str(path))
            failures.append(f"{case}: accepted")
        except ValueError as e:
            if word not in str(e):
                failures.append(f"{case}: message {str(e)[:120]!r} lacks {word!r}")
        except Exception as e:  # noqa: BLE001 - anything else is a failure to report
            failures.append(f"{case}: {type(e).__name__}: {str(e)[:120]}")
    return failures


@pytest.mark.parametrize("codec", tg.CODECS)
def test_corrupt_artifacts_are_refused_with_clear_errors(quantized, tmp_path, codec):
    """Bad magic/version/codec, truncation, flipped bytes and short/long tensor data raise a clear ValueError."""
    if codec not in tg.available_codecs():
        pytest.skip(f"{codec} not installed")
    h, _, _, entries = quantized
    small = {k: v for k, v in entries.items() if k.startswith("blocks.0.") or k == "tok_emb.weight"}
    payload = tg.serialize(small, config_of(h), {}, "row")
    failures = check_refused(tmp_path, corruptions(tg.pack(payload, codec), payload, codec))
    assert not failures, "\n".join(failures)


def test_payload_with_inconsistent_header_is_a_clear_error(quantized, tmp_path):
    """A checksum-valid payload too short for its own length field or JSON header: ValueError saying corrupt."""
    h, _, _, entries = quantized
    payload = tg.serialize({"tok_emb.weight": entries["tok_emb.weight"]}, config_of(h), {}, "row")
    failures = check_refused(tmp_path, inconsistent_payloads(payload, "lzma"))
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- atomic write

def test_write_atomic_success_leaves_only_the_final_file(tmp_path):
    """On success the final file has the bytes (also when replacing an old one) and no tmp file remains."""
    path = tmp_path / "a.ptz"
    tg.write_atomic(str(path), b"first")
    tg.write_atomic(str(path), b"second version")
    assert path.read_bytes() == b"second version" and os.listdir(tmp_path) == ["a.ptz"]


@pytest.mark.parametrize("failure", ["replace", "fsync", "bad data"])
def test_write_atomic_failure_never_leaves_a_partial_final_file(tmp_path, monkeypatch, failure):
    """If writing fails, the final name holds the old complete file (or nothing), never partial bytes."""
    old, new = tmp_path / "old.ptz", tmp_path / "new.ptz"
    old.write_bytes(b"complete old artifact")

    def boom(*a, **k):
        raise OSError("disk full")

    data = b"x" * 100_000
    if failure == "replace":
        monkeypatch.setattr(tg.os, "replace", boom)
    elif failure == "fsync":
        monkeypatch.setattr(tg.os, "fsync", boom)
    else:
        data = "not bytes"
    for path in (old, new):
        with pytest.raises((OSError, TypeError)):
            tg.write_atomic(str(path), data)
    monkeypatch.undo()
    assert old.read_bytes() == b"complete old artifact"
    assert not new.exists()


# ---------------------------------------------------------------- calibration

def test_collect_hessians_are_xtx_of_every_quantized_matmul_input(monkeypatch):
    """One symmetric PSD Hessian per quantized-matmul input (qkv, proj, fc, mlp.proj per layer), of the right
    size, equal to X^T X of the inputs actually fed to those matrices, over GPTQ_CALIB_BATCHES batches."""
    h = hparams(GPTQ_CALIB_BATCHES=3, VOCAB_SIZE=320)
    model, ctx, n = random_model(h, noise=0.05), Ctx(), h.NUM_LAYERS
    seen = []
    real_linear = tg.F.linear

    def recording_linear(x, w, *a):
        seen.append((w.data_ptr(), x.detach().reshape(-1, x.size(-1)).clone()))
        return real_linear(x, w, *a)

    monkeypatch.setattr(tg.F, "linear", recording_linear)
    loader = RandomLoader(h.VOCAB_SIZE)
    clock = tg.Clock(ctx)
    clock.start()
    hess = tg.collect_hessians(model, loader, h, ctx, clock)
    monkeypatch.undo()
    assert loader.calls == 3
    d, hid = h.MODEL_DIM, h.mlp_hidden
    want = {}
    for i in range(n):
        want[f"blocks.{i}.attn.qkv"] = (model.qo_bank[i].data_ptr(), d)
        want[f"blocks.{i}.attn.proj"] = (model.qo_bank[n + i].data_ptr(), d)
        want[f"blocks.{i}.mlp.fc"] = (model.mlp_up_bank[i].data_ptr(), d)
        want[f"blocks.{i}.mlp.proj"] = (model.mlp_down_bank[i].data_ptr(), hid)
    assert sorted(hess) == sorted(want)
    for key, (ptr, size) in want.items():
        H = hess[key]
        assert H.shape == (size, size), key
        X = torch.cat([x for p, x in seen if p == ptr])
        assert X.size(0) == 3 * 128  # 3 batches of 128 local tokens
        torch.testing.assert_close(H, X.T @ X, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(H, H.T, rtol=1e-5, atol=1e-5)
        ev = torch.linalg.eigvalsh(H.double())
        assert ev.min() >= -1e-6 * ev.max(), key
    for name in tg.unbank(model.state_dict(), n):  # every int6 matrix finds its Hessian
        if tg.hessian_key(name) is not None:
            assert tg.hessian_key(name) in hess


@pytest.mark.parametrize("now_ms", [2000.0, 2500.0])
def test_calibration_at_or_past_the_deadline_collects_nothing(now_ms):
    """With the training clock at or past MAX_WALLCLOCK_SECONDS, no batch is taken and no Hessian returned;
    quantization then still works (plain rounding)."""
    h = hparams(MAX_WALLCLOCK_SECONDS=2, GPTQ_RESERVE_SECONDS=0.5, GPTQ_CALIB_BATCHES=5, VOCAB_SIZE=320)
    loader, ctx = RandomLoader(h.VOCAB_SIZE), Ctx()
    hess = tg.collect_hessians(random_model(h, noise=0.05), loader, h, ctx, FakeClock(now_ms))
    assert hess == {} and loader.calls == 0
    assert any(re.search(r"gptq:calibration end .* tokens:0 layers:0", m) for m in ctx.logs)
    entries = tg.quantize_state(random_model(h, noise=0.05), hess, h, ctx)
    assert sum(e["kind"] == "int6" for e in entries.values()) == 6 * h.NUM_LAYERS


def test_calibration_near_the_deadline_does_not_overrun_it():
    """10 ms before the cap, with batches costing 100 ms, calibration takes no batch rather than overrun."""
    h = hparams(MAX_WALLCLOCK_SECONDS=2, GPTQ_RESERVE_SECONDS=0.5, GPTQ_CALIB_BATCHES=5, VOCAB_SIZE=320)
    clock = FakeClock(1990.0)
    loader = RandomLoader(h.VOCAB_SIZE, clock=clock, cost_ms=100.0)
    hess = tg.collect_hessians(random_model(h, noise=0.05), loader, h, Ctx(), clock)
    assert clock.t <= 2000.0 and loader.calls == 0 and hess == {}, (clock.t, loader.calls)


def test_calibration_stops_before_the_deadline():
    """Batches costing 100 ms from t=450 ms with a 1 s cap: calibration stops without crossing 1000 ms."""
    h = hparams(MAX_WALLCLOCK_SECONDS=1, GPTQ_RESERVE_SECONDS=0, GPTQ_CALIB_BATCHES=100, VOCAB_SIZE=320)
    clock = FakeClock(450.0)
    loader, ctx = RandomLoader(h.VOCAB_SIZE, clock=clock, cost_ms=100.0), Ctx()
    hess = tg.collect_hessians(random_model(h, noise=0.05), loader, h, ctx, clock)
    assert clock.t <= 1000.0 and loader.calls >= 3, (clock.t, loader.calls)
    assert len(hess) == 4 * h.NUM_LAYERS
    assert any(f"tokens:{loader.calls * 128} " in m for m in ctx.logs)


def test_calibration_leaves_time_for_the_gptq_solve():
    """With the solve estimated at 200 ms, calibration stops so that 1.25x the estimate still fits before the
    1 s cap; the same run with no estimate calibrates longer."""
    h = hparams(MAX_WALLCLOCK_SECONDS=1, GPTQ_RESERVE_SECONDS=0, GPTQ_CALIB_BATCHES=100, VOCAB_SIZE=320)
    ends = []
    for gptq_ms in (200.0, 0.0):
        clock = FakeClock(450.0)
        loader, ctx = RandomLoader(h.VOCAB_SIZE, clock=clock, cost_ms=50.0), Ctx()
        tg.collect_hessians(random_model(h, noise=0.05), loader, h, ctx, clock, gptq_ms)
        assert clock.t + 1.25 * gptq_ms <= 1000.0 and loader.calls >= 2, (clock.t, loader.calls)
        assert any(f"deadline:{1000 - 1.25 * gptq_ms:.0f}ms" in m for m in ctx.logs)
        ends.append(clock.t)
    assert ends[0] < ends[1] - 200
