"""A run never fails silently: data and tokenizer checked before anything is spent, outputs checked at
start-up, a crash's traceback in the run log and one error line on the console, a run that read data past
the cap or quantized without Hessians says it is not a valid submission, progress lines by time."""
import json
import re
import shutil
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, FakeCtx as Ctx, make_text, random_model, run_script, tiny_env, tiny_hparams
from test_quant import FakeClock, RandomLoader

sys.path.insert(0, str(ROOT / "data"))
import build_shards  # noqa: E402  (the data scripts write the manifest train_gpt.py checks)


@pytest.fixture()
def shards(tiny_tokenizer, tiny_data, tmp_path):
    """A copy of the tiny shards with the manifest data/build_shards.py writes."""
    d = tmp_path / "shards"
    shutil.copytree(tiny_data, d)
    build_shards.write_manifest(d, tiny_tokenizer, "data/build_shards.py")
    return d


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """Another 320-piece tokenizer (other text): same vocab size, other pieces."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("other_tok")
    (d / "text.txt").write_text("\n".join(make_text(300, 99)).upper(), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "other"), model_type="bpe",
                                   vocab_size=320, byte_fallback=True, bos_id=1, eos_id=2, unk_id=3, pad_id=0,
                                   minloglevel=2)
    return d / "other.model"


def test_the_manifest_refuses_another_tokenizer(shards, tiny_tokenizer, other_tokenizer):
    h = tiny_hparams(DATA_PATH=str(shards), TOKENIZER_PATH=str(tiny_tokenizer))
    ctx = Ctx()
    tg.check_manifest(h, ctx)
    sha = json.loads((shards / "manifest.json").read_text())["tokenizer"]["sha256"]
    assert ctx.logs == [f"tokenizer_sha256:{sha} manifest:{shards / 'manifest.json'}"]
    h = tiny_hparams(DATA_PATH=str(shards), TOKENIZER_PATH=str(other_tokenizer))
    with pytest.raises(ValueError, match=r"^TOKENIZER_PATH=.*other\.model \(sha256 \w{12}\) is not the tokenizer of "
                                         r"the shards in DATA_PATH: .*manifest\.json names tiny\.model"):
        tg.check_manifest(h, Ctx())


def test_the_manifest_counts_the_validation_tokens(shards, tiny_tokenizer):
    h = tiny_hparams(DATA_PATH=str(shards), TOKENIZER_PATH=str(tiny_tokenizer))
    shutil.copy(shards / "fineweb_val_000000.bin", shards / "fineweb_val_000001.bin")  # a foreign extra shard
    with pytest.raises(ValueError, match=r"the validation shards hold \d+ tokens, .*manifest\.json says \d+"):
        tg.check_manifest(h, Ctx())
    (shards / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: not a shard manifest"):
        tg.check_manifest(h, Ctx())
    (shards / "manifest.json").unlink()
    ctx = Ctx()
    tg.check_manifest(h, ctx)  # shards without a manifest (older downloads) are read as before, and it says so
    assert ctx.logs[0].endswith(" manifest:none")


def test_a_file_that_is_no_tokenizer_names_the_setting(tmp_path):
    junk = tmp_path / "tok.model"
    junk.write_bytes(b"\x00 not a model" * 50)
    with pytest.raises(ValueError, match=r"^TOKENIZER_PATH=.*tok\.model: not a SentencePiece model"):
        tg.load_tokenizer(str(junk), 320)
    with pytest.raises(FileNotFoundError, match=r"cached_challenge_fineweb\.py .*build_shards\.py"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 320)


def test_no_data_says_which_command_gets_or_builds_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no shard matches .*\(DATA_PATH\): get the published shards .*"
                                                r"cached_challenge_fineweb\.py .*build_shards\.py"):
        tg.list_shards(str(tmp_path / "fineweb_train_*.bin"))


def test_an_unwritable_artifact_path_fails_before_the_first_step(tiny_tokenizer, tiny_data, tmp_path):
    """ARTIFACT_PATH in a missing directory fails at start-up, not after training and GPTQ: the console gets
    one error line, and the run log holds it with its traceback."""
    env = tiny_env(tiny_tokenizer, tiny_data, ARTIFACT_PATH=str(tmp_path / "no_such_dir" / "m.ptz"), RUN_ID="bad")
    r = run_script(tmp_path, env)
    want = f"error: ValueError: ARTIFACT_PATH={tmp_path / 'no_such_dir' / 'm.ptz'}: cannot be written"
    assert r.returncode == 1 and r.stderr.startswith(want) and len(r.stderr.splitlines()) == 1, r.stderr
    assert "(traceback: logs/bad.txt)" in r.stderr
    log = (tmp_path / "logs" / "bad.txt").read_text().split("=" * 100)[-1]
    assert "Traceback (most recent call last)" in log and "in check_outputs" in log
    assert log.rstrip().splitlines()[-1] == r.stderr.split(" (traceback")[0]
    assert not re.search(r"^(step|warmup_step):", log, re.M)


def test_without_brotli_a_run_stops_at_start_up_naming_it(monkeypatch):
    """The cap fit counts the code as its brotli wrapper: without brotli a training run stops before its first
    step, naming the package; re-evaluating an artifact needs no code size."""
    monkeypatch.setitem(sys.modules, "brotli", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"codec brotli is not installed: pip install brotli"):
        tg.check_outputs(tg.Hyperparameters({"RUN_ID": "x"}))
    tg.check_outputs(tg.Hyperparameters({"RUN_ID": "x", "EVAL_ARTIFACT": "m.ptz"}))


def test_under_torchrun_the_error_is_printed_once(tiny_tokenizer, tiny_data, tmp_path):
    """Two ranks fail alike (no validation shards): one error line on the console, from rank 0, instead of
    two tracebacks; the log has rank 0's traceback and rank 1's error line."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_data / "fineweb_train_000000.bin", data)
    r = run_script(tmp_path, tiny_env(tiny_tokenizer, data, RUN_ID="two"), nproc=2)
    mine = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(mine) == 1, r.stderr[-3000:]
    assert "train_gpt.py\", line" not in r.stderr  # no traceback of ours (torchrun prints its own)
    assert mine[0].startswith("error: FileNotFoundError: no shard matches") and tg.VAL_SHARDS in mine[0]
    log = (tmp_path / "logs" / "two.txt").read_text()
    assert log.count("Traceback (most recent call last)") == 1 and "rank 1: error: FileNotFoundError" in log


def test_calibration_past_the_cap_and_without_hessians_is_flagged():
    """The clock already past the 2 s cap: no batch is taken, and the log says the run read data past the cap
    and that GPTQ falls back to rounding without Hessians, on run_invalid lines (records/tool.py refuses)."""
    h = tiny_hparams(MAX_WALLCLOCK_SECONDS=2, GPTQ_RESERVE_SECONDS=0.5, GPTQ_CALIB_BATCHES=5)
    ctx = Ctx()
    hess = tg.collect_hessians(random_model(h), RandomLoader(h.VOCAB_SIZE), h, ctx, FakeClock(2500.0), tg.Budget(h))
    invalid = [m for m in ctx.logs if m.startswith("run_invalid: ")]
    assert hess == {} and len(invalid) == 2, ctx.logs
    assert re.match(r"run_invalid: training and calibration read data until 2500ms, past the 2000ms cap by 500ms",
                    invalid[0])
    assert re.match(r"run_invalid: GPTQ without Hessians: calibration took 0/5 batches .*clip-search rounding",
                    invalid[1])
    tg.quantize_state(random_model(h), hess, h, ctx)
    assert re.search(rf"gptq:quantized 0 matrices with Hessians, {6 * h.NUM_LAYERS + 1} without", ctx.logs[-1])


def test_a_short_calibration_is_a_warning_and_a_full_one_is_silent():
    h = tiny_hparams(MAX_WALLCLOCK_SECONDS=1, GPTQ_RESERVE_SECONDS=0, GPTQ_CALIB_BATCHES=100)
    clock = FakeClock(450.0)
    ctx = Ctx()
    tg.collect_hessians(random_model(h), RandomLoader(h.VOCAB_SIZE, clock=clock, cost_ms=100.0), h, ctx, clock,
                        tg.Budget(h))
    assert any(re.match(r"calibration_short: batches:[1-5]/100 deadline:1000ms", m) for m in ctx.logs), ctx.logs
    assert not any(m.startswith("run_invalid") for m in ctx.logs)
    h = tiny_hparams(MAX_WALLCLOCK_SECONDS=0, GPTQ_CALIB_BATCHES=2)
    ctx = Ctx()
    tg.collect_hessians(random_model(h), RandomLoader(h.VOCAB_SIZE), h, ctx, FakeClock(0.0), tg.Budget(h))
    assert not any(m.startswith(("run_invalid", "calibration_short")) for m in ctx.logs), ctx.logs


def test_progress_is_due_by_time(monkeypatch):
    """No phase is silent for longer than PROGRESS_SECONDS: a line is due by the caller's cadence or by time."""
    now = [100.0]
    monkeypatch.setattr(tg.time, "perf_counter", lambda: now[0])
    p = tg.Progress()
    assert p.due(True) and not p.due()
    now[0] += tg.PROGRESS_SECONDS - 1
    assert not p.due()
    now[0] += 1
    assert p.due() and not p.due()


def test_slow_evaluation_prints_progress(sp, luts, monkeypatch):
    """The sliding evaluation with every batch 'taking' longer than PROGRESS_SECONDS logs its progress."""
    from conftest import stream
    h = tiny_hparams(EVAL_SEQ_LEN=32, EVAL_STRIDE=8, EVAL_BATCH_SEQS=4)
    monkeypatch.setattr(tg, "PROGRESS_SECONDS", 0.0)
    ctx = Ctx()
    tg.eval_val_sliding(random_model(h), stream(sp, 200), h, ctx, tg.token_bytes(stream(sp, 200), luts))
    lines = [m for m in ctx.logs if m.startswith("eval_progress")]
    assert lines and re.fullmatch(r"eval_progress windows:\d+/\d+ \(this rank's\)", lines[-1])
