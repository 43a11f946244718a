"""A second month on the sample's mirror: the dump a month later, as Wikipedia would publish it.

    python -m tests.next_dump --mirror data/sample/mirror [--date 20160201] [--seed 0]

The monthly refresh needs two dumps of the same wiki, and the sample has one (enwiki 20160101,
106 articles and 100 redirects from gensim's test data). This makes the next one from it:
- the same pages under the same ids, most of them byte for byte;
- some articles edited: a paragraph of real, unseen English text added (a news story from the
  Lee corpus that the same gensim wheel ships), with a new revision id, timestamp and sha1;
- some articles deleted;
- some new articles, under new page ids, each another Lee corpus story;
- a fresh dumpstatus.json whose articles job was `updated` on the new date, and the dump's
  sha1sums file, so fetch-dump verifies it as it verifies a real dump; beside them changes.json
  (page ids kept, edited, deleted, new), which no step reads.
Which page is edited, deleted or kept is a function of its id and the seed, so the same call
makes the same bytes. `changes()` says what was done, for the tests and bench/months.py.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, unescape

from bertdistill.sample import GENSIM, SAMPLE_DATE, SAMPLE_WIKI, file_hash, wheel

LEE = "gensim/test/test_data/lee_background.cor"
PAGE = re.compile(r"  <page>\n.*?\n  </page>\n", re.S)
NEXT_DATE = "20160201"


@dataclass
class Changes:
    """What the next month did to the sample's articles, by page id."""

    kept: list[int] = field(default_factory=list)
    edited: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    new: list[int] = field(default_factory=list)


def _field(page: str, tag: str) -> str | None:
    found = re.search(rf"<{tag}>(.*?)</{tag}>", page)
    return found.group(1) if found else None


def _fraction(page_id: int, seed: int, salt: str) -> float:
    """A number in [0, 1) fixed by the page id, the seed and what it decides."""
    digest = hashlib.sha256(f"{seed}:{salt}:{page_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _mediawiki_sha1(text: str) -> str:
    """The <sha1> MediaWiki writes: the text's SHA-1 in base 36, 31 digits."""
    number = int(hashlib.sha1(text.encode()).hexdigest(), 16)
    digits = ""
    while number:
        number, rest = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
    return digits.rjust(31, "0")


def _revise(page: str, text: str, revision: int, timestamp: str) -> str:
    """The page with a new revision: its text, id, parent, timestamp and sha1."""
    old_revision = re.search(r"<revision>\s*<id>(\d+)</id>", page).group(1)
    page = re.sub(r"(<revision>\s*<id>)\d+(</id>)", rf"\g<1>{revision}\g<2>", page, count=1)
    page = re.sub(r"<parentid>\d+</parentid>", f"<parentid>{old_revision}</parentid>", page, count=1)
    page = re.sub(r"<timestamp>[^<]*</timestamp>", f"<timestamp>{timestamp}</timestamp>", page, count=1)
    page = re.sub(r'(<text xml:space="preserve"[^>]*>).*?(</text>)', lambda m: m.group(1) + escape(text) + m.group(2),
                  page, count=1, flags=re.S)
    return re.sub(r"<sha1>[^<]*</sha1>", f"<sha1>{_mediawiki_sha1(text)}</sha1>", page, count=1)


def _new_page(page_id: int, story: str, revision: int, timestamp: str) -> str:
    title = " ".join(story.split()[:6]).rstrip(".,;:")
    text = f"'''{title}''' is a news story of {timestamp[:7]}.\n\n{story}\n\n[[Category:News]]"
    return (f"  <page>\n    <title>{escape(title)}</title>\n    <ns>0</ns>\n    <id>{page_id}</id>\n"
            f"    <revision>\n      <id>{revision}</id>\n      <timestamp>{timestamp}</timestamp>\n"
            f"      <contributor>\n        <username>Sample</username>\n        <id>1</id>\n      </contributor>\n"
            f"      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
            f'      <text xml:space="preserve">{escape(text)}</text>\n'
            f"      <sha1>{_mediawiki_sha1(text)}</sha1>\n    </revision>\n  </page>\n")


def next_month(xml: str, stories: list[str], date: str, seed: int = 0, edited: float = 0.15,
               deleted: float = 0.05, new: int = 12) -> tuple[str, Changes]:
    """The dump's XML a month later, and what changed. Redirects are kept as they are."""
    timestamp = f"{date[:4]}-{date[4:6]}-{date[6:]}T00:00:00Z"
    changes = Changes()
    story = iter(stories)
    revision = 10**9 + seed * 10**6

    def month_two(match: re.Match) -> str:
        nonlocal revision
        page = match.group(0)
        page_id = int(_field(page, "id"))
        if "<redirect" in page or _field(page, "ns") != "0":
            return page
        if _fraction(page_id, seed, "delete") < deleted:
            changes.deleted.append(page_id)
            return ""
        if _fraction(page_id, seed, "edit") < edited:
            changes.edited.append(page_id)
            text = re.search(r'<text xml:space="preserve"[^>]*>(.*?)</text>', page, re.S).group(1)
            revision += 1
            body = unescape(text, {"&quot;": '"', "&apos;": "'"})
            cut = body.find("\n==")  # the new paragraph ends the lead section, where news goes
            cut = len(body) if cut < 0 else cut
            return _revise(page, f"{body[:cut]}\n\n{next(story)}{body[cut:]}", revision, timestamp)
        changes.kept.append(page_id)
        return page

    out = PAGE.sub(month_two, xml)
    last_id = max(int(i) for i in re.findall(r"<page>\s*<title>.*?</title>\s*<ns>\d+</ns>\s*<id>(\d+)</id>", xml,
                                              re.S))
    pages = []
    for k in range(new):
        revision += 1
        page_id = last_id + 1 + k
        changes.new.append(page_id)
        pages.append(_new_page(page_id, next(story), revision, timestamp))
    end = out.rindex("</mediawiki>")
    return out[:end] + "".join(pages) + out[end:], changes


def lee_stories(cache: Path) -> list[str]:
    """The Lee corpus (300 Australian news stories, one a line) from the gensim wheel the sample uses."""
    with zipfile.ZipFile(wheel(GENSIM, cache)) as archive:
        return [line.strip() for line in archive.read(LEE).decode("utf-8").splitlines() if line.strip()]


def make_next_month(mirror: Path, cache: Path, date: str = NEXT_DATE, seed: int = 0) -> Changes:
    """Write <mirror>/enwiki/<date>/ (dump file, dumpstatus.json, sha1sums) from the sample's month."""
    source_dir = mirror / SAMPLE_WIKI / SAMPLE_DATE
    [source] = sorted(source_dir.glob("*-pages-articles*.bz2"))
    xml = bz2.decompress(source.read_bytes()).decode("utf-8")
    out, changes = next_month(xml, lee_stories(cache), date, seed)
    name = source.name.replace(SAMPLE_DATE, date)
    folder = mirror / SAMPLE_WIKI / date
    tmp = Path(tempfile.mkdtemp(dir=mirror, prefix=f".{date}-"))  # renamed into place once complete
    tmp.chmod(0o755)
    try:
        staged = tmp / name
        staged.write_bytes(bz2.compress(out.encode("utf-8"), 9))
        sha1 = file_hash(staged, "sha1")
        status = {"jobs": {"articlesdump": {"status": "done", "updated": f"{date[:4]}-{date[4:6]}-{date[6:]} 00:00:00",
                                            "files": {name: {"size": staged.stat().st_size, "sha1": sha1,
                                                             "md5": file_hash(staged, "md5"),
                                                             "url": f"/{SAMPLE_WIKI}/{date}/{name}"}}}},
                  "version": "0.8"}
        (tmp / "dumpstatus.json").write_text(json.dumps(status, indent=1))
        (tmp / f"{SAMPLE_WIKI}-{date}-sha1sums.txt").write_text(f"{sha1}  {name}\n")
        (tmp / "changes.json").write_text(json.dumps(changes.__dict__, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=Path("data/sample/mirror"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/wheels"))
    parser.add_argument("--date", default=NEXT_DATE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    c = make_next_month(args.mirror, args.cache, args.date, args.seed)
    print(f"{args.mirror / SAMPLE_WIKI / args.date}: {len(c.kept)} articles kept, {len(c.edited)} edited, "
          f"{len(c.deleted)} deleted, {len(c.new)} new")


if __name__ == "__main__":
    main()
