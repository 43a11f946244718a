"""Benchmark make-examples as a user runs it: the whole `bertdistill make-examples` process.

Prints, for dupe_factor 1 and 5 on the sample's text (all 105 articles as one shard) and
for a text ten times larger: examples/s and input MB/s over the process's wall time
(start-up, imports and writing included) and peak memory of the process tree, sampled
every 20 ms: the sum of RSS over the parent and its workers (which counts pages shared
after fork once per process, so it overstates) and the sum of PSS (shared pages split
between the processes that share them: the honest figure).

    python bench/make_examples.py [--google]

--google also times Google's create_pretraining_data.py (from the bert-tensorflow wheel)
on the same text at dupe_factor 5, for the baseline.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sample_text(work: Path) -> Path:
    from tests.conftest import SAMPLE_DUMP_NAME

    from bertdistill.sample import make_sample

    sample = ROOT / "data" / "sample"
    make_sample(sample, ROOT / ".cache" / "wheels")
    subprocess.run([sys.executable, "-m", "bertdistill.cli", "extract", "--input", str(sample / SAMPLE_DUMP_NAME),
                    "--output", str(work / "articles"), "--log-level", "WARNING"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "bertdistill.cli", "build-corpus", "--input", str(work / "articles"),
                    "--output", str(work / "text"), "--train-shards", "1", "--heldout-shards", "0",
                    "--log-level", "WARNING"], check=True, stdout=subprocess.DEVNULL)
    return work / "text" / "train" / "shard-00000.txt"


def measure(command: list[str]) -> dict:
    """Wall time and peak tree memory of a command, sampled every 20 ms."""
    started = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [proc, *proc.children(recursive=True)]:
                info = p.memory_full_info()
                rss += info.rss
                pss += info.pss
        except psutil.Error:
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode})")
    return {"seconds": seconds, "rss_mb": peak_rss / 2**20, "pss_mb": peak_pss / 2**20, "stdout": out}


def count_records(path: Path) -> int:
    from bertdistill.tfrecord import read_records

    with open(path, "rb") as f:
        return sum(1 for _ in read_records(f))


def ours(text: Path, out: Path, vocab: Path, dupe: int) -> dict:
    result = measure([sys.executable, "-m", "bertdistill.cli", "make-examples", "--input", str(text), "--output",
                      str(out), "--vocab-file", str(vocab), "--dupe-factor", str(dupe), "--force",
                      "--log-level", "WARNING"])
    result["examples"] = count_records(out)
    return result


def google(text: Path, out: Path, vocab: Path, dupe: int) -> dict:
    result = measure([sys.executable, "-m", "bert.create_pretraining_data", f"--input_file={text}",
                      f"--output_file={out}", f"--vocab_file={vocab}", "--do_lower_case=True",
                      "--max_seq_length=128", "--max_predictions_per_seq=20", "--masked_lm_prob=0.15",
                      "--random_seed=12345", f"--dupe_factor={dupe}"])
    result["examples"] = count_records(out)
    return result


def report(name: str, text: Path, r: dict) -> None:
    mb = text.stat().st_size / 1e6
    print(f"{name:<34} {r['examples']:>9,} ex {r['seconds']:>7.2f} s {r['examples'] / r['seconds']:>10,.0f} ex/s "
          f"{mb / r['seconds']:>6.2f} MB/s  peak RSS(sum) {r['rss_mb']:>6.0f} MB  PSS(sum) {r['pss_mb']:>6.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--google", action="store_true", help="also time Google's create_pretraining_data.py")
    args = parser.parse_args()
    from tests.conftest import commit_as

    vocab = ROOT / "data" / "sample" / "vocab.txt"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = sample_text(work)
        big = work / "big" / "train" / "shard-00000.txt"
        big.parent.mkdir(parents=True)
        big.write_text(text.read_text(encoding="utf-8") * 10, encoding="utf-8")
        commit_as("build-corpus", work / "big")  # make-examples reads only a text shard build-corpus committed
        print(f"sample text {text.stat().st_size / 1e6:.1f} MB; large text {big.stat().st_size / 1e6:.1f} MB; "
              f"{psutil.cpu_count()} CPUs")
        ours(text, work / "warmup.tfrecord", vocab, 1)  # page cache, .pyc files
        for dupe in (1, 5):
            report(f"bertdistill dupe_factor={dupe} sample", text, ours(text, work / "o.tfrecord", vocab, dupe))
        report("bertdistill dupe_factor=5 10x text", big, ours(big, work / "big.tfrecord", vocab, 5))
        if args.google:
            report("google create_pretraining_data d=5", text, google(text, work / "g.tfrecord", vocab, 5))


if __name__ == "__main__":
    main()
