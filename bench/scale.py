"""Benchmark the data steps at N times the sample, and extrapolate to full English Wikipedia.

A synthetic dump holds the sample's pages N times over, each copy under fresh page ids (new
documents, not duplicates, for the hash-based train/held-out split). It is served by a local
mirror and run through the data steps as a user's run does, each step as its own process:
fetch-dump, extract, build-corpus (8 train + 1 held-out shards) and make-examples of one
train shard. Per step it prints wall time, throughput, peak memory of the process tree (sum
of PSS, sampled every 20 ms) and peak local scratch. Then, from the largest N, the time of
each step on full enwiki (22 GB of bz2 in 27 files; 16 GB of text) on this machine and on P
pods of the same size, where extract fans out per dump file and make-examples per shard.

    python bench/scale.py [--copies 1 10] [--dupe 5] [--pods 64]

Memory that stays flat from 1x to Nx is the claim under test: no step may hold its input.
"""

from __future__ import annotations

import argparse
import bz2
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from tests.scratch_peak import ScratchPeak  # noqa: E402

from make_examples import measure  # noqa: E402  (this folder's make-examples benchmark)

FULL_DUMP_BYTES = 22e9
FULL_DUMP_FILES = 27
FULL_TEXT_BYTES = 16e9


def synthetic_dump(sample_dump: Path, copies: int, out: Path) -> Path:
    """The sample's <page>s `copies` times, copy c with page id + c x 10^8 and its title suffixed."""
    xml = bz2.decompress(sample_dump.read_bytes()).decode()
    head, _, rest = xml.partition("<page>")
    body, _, tail = ("<page>" + rest).rpartition("</page>")
    pages = re.findall(r"<page>.*?</page>", body + "</page>", flags=re.S)
    parts = [head]
    for c in range(copies):
        for page in pages:
            if c:
                page = re.sub(r"<id>(\d+)</id>", lambda m, c=c: f"<id>{int(m.group(1)) + c * 10**8}</id>", page,
                              count=1)
                page = re.sub(r"<title>(.*?)</title>", lambda m, c=c: f"<title>{m.group(1)} {c}</title>", page,
                              count=1)
            parts.append(page)
    parts.append(tail)
    out.write_bytes(bz2.compress("\n".join(parts).encode(), 9))
    return out


def run_steps(dump: Path, work: Path, vocab: Path, dupe: int) -> dict[str, dict]:
    from bertdistill.sample import _make_mirror

    _make_mirror(dump, work / "mirror")
    scratch = work / "scratch"
    scratch.mkdir()
    os.environ["BERTDISTILL_SCRATCH"] = str(scratch)
    store = work / "store"
    cli = [sys.executable, "-m", "bertdistill.cli"]
    [name] = [p.name for p in (work / "mirror" / "enwiki" / "20160101").glob("*.bz2")]
    steps = {
        "fetch-dump": ["fetch-dump", "--wiki", "enwiki", "--date", "20160101", "--mirror", str(work / "mirror"),
                       "--output", str(store / "dumps")],
        "extract": ["extract", "--input", str(store / "dumps" / "enwiki" / "20160101" / name), "--output",
                    str(store / "articles")],
        "build-corpus": ["build-corpus", "--input", str(store / "articles"), "--output", str(store / "text"),
                         "--train-shards", "8", "--heldout-shards", "1"],
        "make-examples": ["make-examples", "--input", str(store / "text" / "train" / "shard-00000.txt"), "--output",
                          str(store / "examples" / "shard-00000.tfrecord"), "--vocab-file", str(vocab),
                          "--dupe-factor", str(dupe)],
    }
    inputs = {"fetch-dump": lambda: dump.stat().st_size, "extract": lambda: dump.stat().st_size,
              "build-corpus": lambda: sum(p.stat().st_size for p in (store / "articles").rglob("*.gz")),
              "make-examples": lambda: (store / "text" / "train" / "shard-00000.txt").stat().st_size}
    results = {}
    for step, args in steps.items():
        with ScratchPeak(scratch) as watch:
            r = measure([*cli, *args, "--log-level", "WARNING"])
        r.update(input_bytes=inputs[step](), scratch_mb=watch.peak / 2**20)
        results[step] = r
    results["text_bytes"] = sum(p.stat().st_size for p in (store / "text").rglob("*.txt"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--dupe", type=int, default=5)
    parser.add_argument("--pods", type=int, default=64)
    args = parser.parse_args()
    from tests.conftest import SAMPLE_DUMP_NAME

    from bertdistill.sample import make_sample

    sample = ROOT / "data" / "sample"
    make_sample(sample, ROOT / ".cache" / "wheels")
    print(f"{os.cpu_count()} CPU cores; dupe factor {args.dupe}; peak memory = sum of PSS over the process tree")
    print(f"{'copies':>6} {'step':<13} {'input MB':>9} {'wall s':>7} {'MB/s':>6} {'PSS MB':>7} {'scratch MB':>10}")
    last = None
    for copies in args.copies:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            dump = synthetic_dump(sample / SAMPLE_DUMP_NAME, copies, work / "synthetic.xml.bz2")
            results = run_steps(dump, work, sample / "vocab.txt", args.dupe)
        for step, r in results.items():
            if step == "text_bytes":
                continue
            print(f"{copies:>6} {step:<13} {r['input_bytes'] / 1e6:>9.1f} {r['seconds']:>7.1f} "
                  f"{r['input_bytes'] / 1e6 / r['seconds']:>6.2f} {r['pss_mb']:>7.0f} {r['scratch_mb']:>10.1f}")
        last = (copies, dump_size := results["fetch-dump"]["input_bytes"], results)
    copies, dump_size, results = last
    text_per_dump = results["text_bytes"] / dump_size
    print(f"\nFull enwiki from {copies}x ({FULL_DUMP_BYTES / 1e9:.0f} GB bz2 in {FULL_DUMP_FILES} files; "
          f"{FULL_TEXT_BYTES / 1e9:.0f} GB text; the synthetic dump gave {text_per_dump:.2f} text bytes per bz2 byte):")
    print(f"{'step':<13} {'this machine, h':>16} {f'{args.pods} pods, h':>12}")
    for step, full_input, units in (("fetch-dump", FULL_DUMP_BYTES, 1), ("extract", FULL_DUMP_BYTES, FULL_DUMP_FILES),
                                    ("build-corpus", FULL_TEXT_BYTES * 0.4, 1),
                                    ("make-examples", FULL_TEXT_BYTES, 10**9)):
        r = results[step]
        hours = full_input / (r["input_bytes"] / r["seconds"]) / 3600
        print(f"{step:<13} {hours:>16.1f} {hours / min(args.pods, units):>12.2f}")
    print("(fetch-dump here reads a local mirror: its figure is verification, not download; build-corpus's input is "
          "its gzip'd articles, taken as 0.4 of the text)")


if __name__ == "__main__":
    main()
