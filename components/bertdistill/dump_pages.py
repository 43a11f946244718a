"""A MediaWiki XML dump split into its pages, each keyed by its own XML: what lets extract copy last
month's article for a page that did not change instead of running WikiExtractor on it again.

extract runs WikiExtractor with --no-templates, which never loads template pages, so an article is a
function of its page's XML and of two things in <siteinfo>: the base URL (its `url`) and the namespace
names (which pages are templates or modules). A page whose XML is byte-identical to last month's, in a
dump with the same base and namespaces, gives a byte-identical article. The key is therefore a hash of
the page's whole XML: any edit (a new revision id, text, sha1, title, redirect) finds nothing.

Dumps put `<page>` and `</page>` on lines of their own (MediaWiki's XmlDumpWriter), which is all the
splitting relies on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import BinaryIO

_PAGE_ID = re.compile(rb"<id>(\d+)</id>")
_SITEINFO_LINE = re.compile(rb"<base>|<namespace[ >]")


def split(dump: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """("head", everything before the first page) once, then ("page", one page's lines) per page, with
    ("other", ...) for anything between pages and after the last (the closing </mediawiki>), from a
    decompressed dump read as lines. A page cut short by the dump's end is still a "page"."""
    part: list[bytes] = []
    kind = "head"
    for line in dump:
        stripped = line.strip()
        if kind != "page" and stripped == b"<page>":
            if part or kind == "head":
                yield kind, b"".join(part)
            part, kind = [line], "page"
            continue
        part.append(line)
        if kind == "page" and stripped == b"</page>":
            yield "page", b"".join(part)
            part, kind = [], "other"
    if part or kind == "head":
        yield kind, b"".join(part)


def page_id(page: bytes) -> str:
    """The page's id: the first <id> in it (the revision's and the contributor's come after)."""
    found = _PAGE_ID.search(page)
    return found.group(1).decode() if found else ""


def page_key(page: bytes) -> str:
    return hashlib.blake2b(page, digest_size=16).hexdigest()


def siteinfo_key(head: bytes) -> str:
    """A hash of what WikiExtractor reads of <siteinfo>: the base URL and the namespaces, in order.
    The generator line (the MediaWiki release, new most months) does not change an article."""
    lines = [line.strip() for line in head.splitlines() if _SITEINFO_LINE.search(line)]
    return hashlib.blake2b(b"\n".join(lines), digest_size=16).hexdigest()
