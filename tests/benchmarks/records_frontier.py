"""records/tool.py over every record folder of an openai/parameter-golf checkout: what parse makes of each seed
log and what check says of each folder. Not a timing: it shows the tool reads the frontier's logs.

    python tests/benchmarks/records_frontier.py UPSTREAM/records/track_10min_16mb [MORE FOLDERS...] [--since D]
        [--out tests/benchmarks/results/records_frontier_<date>.md]

A folder's row: its seed logs (status counts), the metric they claim and its mean against submission.json's
val_bpb, the eval time check reads, how many lines parse left unparsed, and check's result with the rules that
failed (each rule once, × the seeds it failed for; numbers
as N).
"""
import argparse
import contextlib
import io
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from presets_cpu import emit  # tests/benchmarks is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "records"))
import tool  # noqa: E402


def row(folder: Path) -> str:
    runs = [r for r in tool.load_runs(folder) if r["kind"] == "train"]
    status = ", ".join(f"{n} {s}" for s, n in Counter(r["status"] for r in runs).items()) or "no logs"
    claimed = [r["legal_metric"] for r in runs if r["legal_metric"]]
    names = "/".join(sorted({m["name"] for m in claimed})) or "–"
    mean = f"{statistics.fmean(m['val_bpb'] for m in claimed):.5f}" if claimed else "–"
    try:
        sub = json.loads((folder / "submission.json").read_text()).get("val_bpb")
    except (OSError, ValueError):
        sub = None
    evals = [r["eval_time_s"] for r in runs if r.get("eval_time_s") is not None]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        tool.check(folder, None)
    fails = Counter(re.sub(r"-?\d[\d,.]*", "N", re.sub(r"seed \S+: ", "", x[6:]))[:64]
                    for x in out.getvalue().splitlines() if x.startswith("FAIL"))
    verdict = out.getvalue().split("RESULT: ")[1].split(" (")[0]
    failed = "; ".join(f"{t}{f' (×{n})' if n > 1 else ''}" for t, n in fails.items())
    return (f"| {folder.name[:48]} | {len(runs)}: {status} | {names} | {mean} | {sub} | "
            f"{max(evals, default=0):.1f} | {sum(len(r['unparsed']) for r in runs)} | {verdict} | {failed} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="record folders, or folders of them (records/track_10min_16mb)")
    ap.add_argument("--since", default="2026-03-23", help="first folder date (#549's)")
    ap.add_argument("--out")
    a = ap.parse_args()
    folders = sorted(f for d in map(Path, a.dirs) for f in ([d] if (d / "submission.json").is_file() else d.iterdir())
                     if f.is_dir() and f.name >= a.since)
    lines = ["| folder | seed logs | claimed metric | mean val_bpb | submission.json | max eval s | unparsed lines "
             "| check | failed rules |", "|" + "---|" * 9] + [row(f) for f in folders]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
