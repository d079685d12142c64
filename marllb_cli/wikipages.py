"""The synthetic wiki: the page titles that `marllb trace gen wiki` asks for, and an XML dump of those pages
for MediaWiki servers (`app: mediawiki`) to import, so a replayed wiki trace hits real pages.

Pages are made-up wikitext shaped like encyclopedia articles: sections of paragraphs with bold text and
links to other pages, a bulleted list, sometimes a table. Sizes are log-normal (median ≈ 4 KB, a long tail
to ≈ 40 KB, as Wikipedia's article sizes), so rendering costs differ from page to page the way they do on
a real wiki. Page k is the same text for a given seed on every server and every run.

Deliberately free of pandas and numpy: it runs on the nodes (`python -m marllb_cli.deploy.node.cli`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

__all__ = ["page_title", "page_path", "page_text", "write_dump"]

_WORDS = (
    "load balancer server request network traffic flow packet queue latency throughput cluster data center "
    "weight policy agent reward state action episode capacity processor memory storage cache database page "
    "index article history protocol address routing tunnel kernel thread process worker connection session "
    "client response delay variance fairness potential game market equilibrium learning gradient value "
    "function estimate sample batch training evaluation experiment measurement result figure table section"
).split()
_EXPORT_NS = "http://www.mediawiki.org/xml/export-0.11/"


def page_title(k: int) -> str:
    """Title of the k-th most popular page (1-based), as it appears in a URL."""
    return f"Page_{k}"


def page_path(k: int) -> str:
    """The request path of page k on the testbed's servers (MediaWiki's article path)."""
    return f"/wiki/index.php/{page_title(k)}"


def page_text(k: int, pages: int, *, seed: int = 0) -> str:
    """Wikitext of page k of a wiki of `pages` pages: deterministic for (k, pages, seed)."""
    rng = random.Random(f"{seed}:{k}")
    size = min(60_000, int(math.exp(rng.gauss(math.log(4_000), 0.8))))
    sections: list[str] = [f"'''{page_title(k).replace('_', ' ')}''' is {_sentence(rng, pages, 12)}\n"]
    while sum(map(len, sections)) < size:
        heading = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3))).capitalize()
        paragraphs = "\n\n".join(
            " ".join(_sentence(rng, pages, rng.randint(8, 24)) for _ in range(rng.randint(2, 6)))
            for _ in range(rng.randint(1, 3))
        )
        sections.append(f"== {heading} ==\n{paragraphs}\n")
    sections.append("".join(f"* {_sentence(rng, pages, rng.randint(4, 10))}\n" for _ in range(rng.randint(3, 8))))
    if rng.random() < 0.3:
        rows = "".join(f"|-\n| {_word(rng)} || {rng.randint(1, 10_000)}\n" for _ in range(rng.randint(3, 12)))
        sections.append(f'{{| class="wikitable"\n! Name !! Value\n{rows}|}}\n')
    return "\n".join(sections)


def write_dump(path: Path, pages: int, *, seed: int = 0) -> None:
    """A MediaWiki XML export (format 0.11) of pages 1..`pages`, for maintenance/importDump.php."""
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(_dump_lines(pages, seed))


def _dump_lines(pages: int, seed: int) -> Iterator[str]:
    yield f'<mediawiki xmlns="{_EXPORT_NS}" version="0.11" xml:lang="en">\n'
    for k in range(1, pages + 1):
        yield (
            f"<page><title>{page_title(k).replace('_', ' ')}</title><ns>0</ns><revision>"
            "<timestamp>2022-10-17T00:00:00Z</timestamp><contributor><username>marllb</username></contributor>"
            "<model>wikitext</model><format>text/x-wiki</format>"
            f'<text xml:space="preserve">{escape(page_text(k, pages, seed=seed))}</text>'
            "</revision></page>\n"
        )
    yield "</mediawiki>\n"


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _sentence(rng: random.Random, pages: int, words: int) -> str:
    """Words with now and then a link to another page (popular pages more often) or bold text."""
    out = []
    for _ in range(words):
        roll = rng.random()
        if roll < 0.06:
            target = min(pages, int(rng.paretovariate(1.0)))
            out.append(f"[[{page_title(target).replace('_', ' ')}|{_word(rng)}]]")
        elif roll < 0.08:
            out.append(f"'''{_word(rng)}'''")
        else:
            out.append(_word(rng))
    text = " ".join(out)
    return text[0].upper() + text[1:] + "."
