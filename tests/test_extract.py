"""extract on the real sample, and every kind of bad dump the issue lists."""

from __future__ import annotations

import bz2
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, error_lines, run_cli
from tests.next_dump import NEXT_DATE, make_next_month


def _articles(folder: Path) -> list[dict]:
    out = []
    for part in sorted(folder.glob("part-*.jsonl.gz")):
        with gzip.open(part, "rt", encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f)
    return out


def test_every_real_article_comes_out_clean(corpus, sample_dump):
    xml = bz2.decompress(sample_dump.read_bytes()).decode()
    pages = xml.count("<page>")
    redirects = xml.count("<redirect")
    assert (pages, redirects) == (206, 100)
    articles = _articles(corpus / "articles")
    manifest = json.loads((corpus / "articles" / "_MANIFEST.json").read_text())
    # 106 articles reach WikiExtractor's output; one of them has no text and is dropped.
    assert manifest["summary"]["articles"] == pages - redirects == 106
    assert manifest["summary"]["written"] == len(articles) == 105
    assert manifest["outputs"]["part-00000.jsonl.gz"]["bytes"] > 0
    assert len({a["id"] for a in articles}) == len(articles)
    for article in articles:
        assert set(article) == {"id", "title", "url", "text", "page_key"}
        assert article["text"].strip()
        for entity in ("&amp;", "&lt;", "&gt;", "&quot;", "&nbsp;"):
            assert entity not in article["text"] and entity not in article["title"]
    titles = {a["title"] for a in articles}
    assert {"Anarchism", "Autism", "Alberta"} <= titles
    assert all(a["url"].endswith(f"curid={a['id']}") for a in articles)
    # Entities really were there to unescape: WikiExtractor's raw output keeps them.
    assert "&amp;" in xml


def _xml(sample_dump: Path) -> str:
    return bz2.decompress(sample_dump.read_bytes()).decode()


def _redirect_only(xml: str) -> str:
    head = xml[: xml.index("<page>")]
    redirects = [p for p in re.findall(r"<page>.*?</page>", xml, flags=re.S) if "<redirect" in p]
    return head + "".join(redirects[:3]) + "\n</mediawiki>\n"


BAD_DUMPS = {
    "truncated.xml.bz2": (lambda dump: dump.read_bytes()[:800_000], "truncated"),
    "notes.xml": (lambda dump: b"these are my notes, not a dump\n" * 100, "not a MediaWiki XML dump"),
    "nositeinfo.xml": (lambda dump: re.sub(r"<siteinfo>.*?</siteinfo>", "", _xml(dump), flags=re.S).encode(),
                       "no <siteinfo>"),
    "utf16.xml": (lambda dump: _xml(dump)[:200_000].encode("utf-16"), "UTF-16"),
    "redirects.xml.bz2": (lambda dump: bz2.compress(_redirect_only(_xml(dump)).encode()), "no articles"),
    "garbage.xml.bz2": (lambda dump: b"BZh91AY&SY" + b"\x00" * 5000, "cannot decompress"),
}


@pytest.mark.parametrize("name", sorted(BAD_DUMPS))
def test_bad_dump_gets_one_clear_error_and_no_output(name, sample_dump, tmp_path):
    make, message = BAD_DUMPS[name]
    bad = tmp_path / name
    bad.write_bytes(make(sample_dump))
    out = tmp_path / "articles"
    proc = run_cli("extract", "--input", str(bad), "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and message in lines[0] and name in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_missing_input_is_named(tmp_path):
    proc = run_cli("extract", "--input", str(tmp_path / "nope.xml.bz2"), "--output", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "nope.xml.bz2" in error_lines(proc)[0] and "does not exist" in error_lines(proc)[0]


@pytest.fixture(scope="module")
def month_two(tmp_path_factory, sample):
    mirror = tmp_path_factory.mktemp("mirror")
    shutil.copytree(sample / "mirror", mirror, dirs_exist_ok=True)
    changes = make_next_month(mirror, ROOT / ".cache" / "wheels")
    [dump] = (mirror / "enwiki" / NEXT_DATE).glob("*.bz2")
    return dump, changes


def _parts(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.jsonl.gz"))}


def test_unchanged_pages_are_copied_from_last_month_into_the_same_bytes(corpus, month_two, tmp_path):
    dump, changes = month_two
    run_cli("extract", "--input", str(dump), "--output", str(tmp_path / "scratch"), check=True)
    proc = run_cli("extract", "--input", str(dump), "--output", str(tmp_path / "warm"), "--reuse",
                   str(corpus / "articles"), check=True)
    # The same bytes as extracting everything, and so the same documents in the same order for build-corpus.
    assert _parts(tmp_path / "warm") == _parts(tmp_path / "scratch")
    summary = json.loads((tmp_path / "warm" / "_MANIFEST.json").read_text())["summary"]
    month_one = {a["id"] for a in _articles(corpus / "articles")}
    copied = month_one & {str(i) for i in changes.kept}
    assert summary["reused"] == len(copied) > 60 and summary["reused_from"] == [str(corpus / "articles")]
    # WikiExtractor read only the other pages: the edited, the new, the redirects and the page without text.
    pages = 206 - len(changes.deleted) + len(changes.new)
    assert f"WikiExtractor runs on the other {pages - len(copied)}" in proc.stderr
    written = {a["id"]: a for a in _articles(tmp_path / "warm")}
    assert {str(i) for i in changes.edited + changes.new} <= set(written) and not copied & set(map(str, changes.edited))
    assert summary["articles"] == len(written) + summary["empty"]


def test_a_dump_of_another_base_url_reuses_nothing(corpus, month_two, tmp_path):
    dump, _changes = month_two
    moved = tmp_path / dump.name
    xml = bz2.decompress(dump.read_bytes()).replace(b"<base>https://en.wikipedia.org/", b"<base>https://en.example.org/")
    moved.write_bytes(bz2.compress(xml))
    proc = run_cli("extract", "--input", str(moved), "--output", str(tmp_path / "out"), "--reuse",
                   str(corpus / "articles"), str(tmp_path / "no-such-articles"), check=True)
    summary = json.loads((tmp_path / "out" / "_MANIFEST.json").read_text())["summary"]
    assert summary["reused"] == 0 and summary["reused_from"] == []
    assert "another base URL or namespaces" in proc.stderr and "no-such-articles" in proc.stderr
    assert all(a["url"].startswith("https://en.example.org/") for a in _articles(tmp_path / "out"))


def test_the_same_dump_given_its_own_articles_copies_every_one(corpus, sample_dump, tmp_path):
    proc = run_cli("extract", "--input", str(sample_dump), "--output", str(tmp_path / "again"), "--reuse",
                   str(corpus / "articles"), check=True)
    assert _parts(tmp_path / "again") == _parts(corpus / "articles")
    summary = json.loads((tmp_path / "again" / "_MANIFEST.json").read_text())["summary"]
    assert summary["reused"] == summary["written"] == 105
    # Left for WikiExtractor: the 100 redirects (it skips them) and the one article without text.
    assert "WikiExtractor runs on the other 101" in proc.stderr
