"""extract on the real sample, and every kind of bad dump the issue lists."""

from __future__ import annotations

import bz2
import gzip
import json
import re
from pathlib import Path

import pytest

from tests.conftest import error_lines, run_cli


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
        assert set(article) == {"id", "title", "url", "text"}
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
