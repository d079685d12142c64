"""The synthetic wiki: one set of titles for the trace generator and the MediaWiki servers, and a dump that
MediaWiki's importer reads (valid export XML holding exactly the generated text)."""

from __future__ import annotations

import re
import statistics
import xml.etree.ElementTree as ET

from marllb_cli.traces import wiki
from marllb_cli.wikipages import page_path, page_text, write_dump

EXPORT = "{http://www.mediawiki.org/xml/export-0.11/}"


def test_the_wiki_trace_asks_only_for_pages_the_servers_have():
    trace = wiki(rate=50, duration=200, day_s=200, pages=300, seed=4)
    asked = set(trace.loc[trace["class"] == "wiki", "path"])
    assert asked <= {page_path(k) for k in range(1, 301)}
    assert page_path(1) in asked and len(asked) > 100


def test_pages_are_deterministic_and_sized_like_encyclopedia_articles():
    assert page_text(5, 1000) == page_text(5, 1000)
    assert page_text(5, 1000, seed=1) != page_text(5, 1000)
    sizes = [len(page_text(k, 1000)) for k in range(1, 1001)]
    assert 3_000 < statistics.median(sizes) < 7_000
    assert max(sizes) > 4 * statistics.median(sizes)  # a long tail, as article sizes have
    text = page_text(9, 1000)
    assert text.startswith("'''Page 9''' is ") and "\n== " in text and "[[Page " in text


def test_links_point_only_at_existing_pages():
    targets = {int(m) for k in range(1, 200) for m in re.findall(r"\[\[Page (\d+)\|", page_text(k, 50))}
    assert targets and max(targets) <= 50 and min(targets) >= 1


def test_dump_is_export_xml_with_every_page(tmp_path):
    dump = tmp_path / "pages.xml"
    write_dump(dump, 25, seed=3)
    pages = ET.parse(dump).getroot().findall(f"{EXPORT}page")
    assert [p.findtext(f"{EXPORT}title") for p in pages] == [f"Page {k}" for k in range(1, 26)]
    texts = [p.find(f"{EXPORT}revision").findtext(f"{EXPORT}text") for p in pages]
    assert texts == [page_text(k, 25, seed=3) for k in range(1, 26)]  # escaping round-trips (<, &, quotes)
