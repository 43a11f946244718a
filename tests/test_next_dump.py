"""The second month the generator puts on the sample's mirror: what a month of Wikipedia would change,
and a dump the platform's own steps take as they take the real one."""

from __future__ import annotations

import bz2
import gzip
import json
import re
import shutil
import threading
from xml.sax.saxutils import unescape

import pytest

from bertdistill.sample import SAMPLE_DATE
from tests.conftest import ROOT, run_cli
from tests.next_dump import LEE, NEXT_DATE, PAGE, _mediawiki_sha1, lee_stories, make_next_month
from tests.test_fetch_dump import DumpServer

CACHE = ROOT / ".cache" / "wheels"  # where the sample fixture keeps the wheels


@pytest.fixture
def two_months(tmp_path, sample):
    mirror = tmp_path / "mirror"
    shutil.copytree(sample / "mirror", mirror)
    changes = make_next_month(mirror, CACHE)
    return mirror, changes


def _pages(path) -> dict[int, str]:
    xml = bz2.decompress(path.read_bytes()).decode()
    return {int(re.search(r"<id>(\d+)</id>", page).group(1)): page for page in PAGE.findall(xml)}


def test_the_next_month_keeps_edits_deletes_and_adds_articles_as_wikipedia_would(two_months, sample):
    mirror, changes = two_months
    [one] = (mirror / "enwiki" / SAMPLE_DATE).glob("*.bz2")
    [two] = (mirror / "enwiki" / NEXT_DATE).glob("*.bz2")
    before, after = _pages(one), _pages(two)
    assert len(changes.kept) > 60 and len(changes.edited) >= 5 and len(changes.deleted) >= 2 and len(changes.new) >= 5
    for page_id in changes.kept:
        assert after[page_id] == before[page_id]  # byte for byte
    assert not set(changes.deleted) & set(after)
    assert min(changes.new) > max(before)
    stories = lee_stories(CACHE)
    for page_id in changes.edited + changes.new:
        page = after[page_id]
        text = re.search(r'<text xml:space="preserve">(.*?)</text>', page, re.S).group(1)
        text = unescape(text, {"&quot;": '"', "&apos;": "'"})
        assert any(story in text for story in stories), (page_id, LEE)
        assert re.search(r"<sha1>(\w+)</sha1>", page).group(1) == _mediawiki_sha1(text)
        assert f"<timestamp>{NEXT_DATE[:4]}-{NEXT_DATE[4:6]}-{NEXT_DATE[6:]}T00:00:00Z</timestamp>" in page
    for page_id in changes.edited:
        assert after[page_id] != before[page_id]
        assert re.search(r"<title>(.*?)</title>", after[page_id]).group(1) == re.search(
            r"<title>(.*?)</title>", before[page_id]).group(1)
    status = json.loads((mirror / "enwiki" / NEXT_DATE / "dumpstatus.json").read_text())
    assert status["jobs"]["articlesdump"]["updated"].startswith("2016-02-01")
    again = mirror.parent / "again"
    shutil.copytree(sample / "mirror", again)
    make_next_month(again, CACHE)
    [same] = (again / "enwiki" / NEXT_DATE).glob("*.bz2")
    assert same.read_bytes() == two.read_bytes()  # the same call makes the same dump


def test_fetch_dump_takes_the_new_month_as_latest_and_extract_reads_its_changes(two_months, tmp_path):
    mirror, changes = two_months
    server = DumpServer(mirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "dumps"
        run_cli("fetch-dump", "--wiki", "enwiki", "--date", "latest", "--mirror", server.url, "--output", str(out),
                env={"BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}, check=True)
    finally:
        server.shutdown()
        server.server_close()
    manifest = json.loads((out / "enwiki" / NEXT_DATE / "_MANIFEST.json").read_text())
    assert manifest["summary"]["date"] == NEXT_DATE  # sha1 checked against the month's own sha1sums
    [dump] = (out / "enwiki" / NEXT_DATE).glob("*.bz2")
    run_cli("extract", "--input", str(dump), "--output", str(tmp_path / "articles"), check=True)
    ids = set()
    for part in (tmp_path / "articles").glob("*.jsonl.gz"):
        with gzip.open(part, "rt") as f:
            ids |= {int(json.loads(line)["id"]) for line in f}
    assert set(changes.new) <= ids and set(changes.edited) <= ids
    assert not set(changes.deleted) & ids
