"""Every document the project cites exists in the repository, with every section it cites.

A citation is a `*.md` name in include/, dags/, plugins/, tools/, bench/, docs/ or README.md:

- `docs/tier-rules.md` (or any path with a folder): relative to the citing file's folder, else to
  the repository root;
- a bare `tier-rules.md`: a file of that name in the citing file's folder (`README.md` in
  tools/lightspeed_sim/), else the project doc `docs/tier-rules.md`;
- an absolute path outside the repository inside a `docs` folder (the team's shared copy of a
  project doc): the project's own copy in `docs/`; any other path outside the repo cannot be
  followed by a reader of the repo and fails.

A `§ID` written after a citation on the same line (`docs/airflow-3-notes.md §A1`, `§3–§8, §10`)
must be a section of the cited doc: a line of it that *starts* with `§ID` (a heading, a table row,
a list item), not just a mention. A quoted name right after a citation
(`tier-rules.md "Which sales count"`, `docs/contracts.md ("XCom payloads", ...)`) must appear in
the cited doc (case-insensitive). URLs are not citations.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("include", "dags", "plugins", "tools", "bench", "docs")
SCANNED_FILES = ("README.md",)
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".txt",
    ".sh",
    ".html",
    ".js",
    ".css",
    ".yaml",
    ".yml",
    ".toml",
    ".json",
    ".cfg",
}
SKIPPED_PARTS = {"__pycache__", "node_modules", ".venv", ".mypy_cache", ".ruff_cache"}
PROJECT_DOCS = REPO / "docs"

pytestmark = pytest.mark.unit

# A path ending in .md that is not part of a longer word, path or URL (`https://x/y.md` never
# matches: every possible start inside it follows a letter, ':' or '/').
_CITATION = re.compile(r"(?<![\w.:/\\-])((?:\.{1,2}/|/)?(?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w-]|\.\w)")
_ID = r"(?:[A-Z]\d+(?:\.\d+)*|\d+(?:\.\d+)*|[A-Z])"
_MARKER_RANGE = re.compile(rf"§\s?({_ID})(?:\s?[–-]\s?§\s?({_ID}))?")
_QUOTED = re.compile(r'^`?\s*[,(]?\s*"([^"\n]{2,80})"')
_LEADING = re.compile(r"^[\s#|*>\-+]*(?:\d+\.\s+)?[*_`\s]*")


@dataclass(frozen=True)
class Citation:
    source: Path  # the citing file
    line: int
    target: str  # as written
    markers: tuple[str, ...]  # section ids, ranges expanded
    quotes: tuple[str, ...]  # quoted section names

    @property
    def where(self) -> str:
        return f"{self.source.relative_to(REPO)}:{self.line}"


def _expand(first: str, last: str | None) -> list[str]:
    """`3`..`8` for a range `§3–§8` of whole numbers; otherwise both ends as written."""
    if last is None:
        return [first]
    if first.isdigit() and last.isdigit() and int(first) <= int(last):
        return [str(n) for n in range(int(first), int(last) + 1)]
    return [first, last]


def parse_line(text: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(target, section ids, quoted names) of every citation in one line of text."""
    found = list(_CITATION.finditer(text))
    out: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    for i, match in enumerate(found):
        tail = text[match.end() : found[i + 1].start() if i + 1 < len(found) else len(text)]
        markers: list[str] = []
        for m in _MARKER_RANGE.finditer(tail):
            markers.extend(x for x in _expand(m.group(1), m.group(2)) if x not in markers)
        quoted = _QUOTED.match(tail)
        out.append((match.group(1), tuple(markers), (quoted.group(1),) if quoted else ()))
    return out


def _scanned_files() -> Iterator[Path]:
    for name in SCANNED_FILES:
        if (REPO / name).is_file():
            yield REPO / name
    for folder in SCANNED_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIPPED_PARTS & set(path.parts):
                yield path


def collect_citations() -> list[Citation]:
    citations = []
    for path in _scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for target, markers, quotes in parse_line(line):
                citations.append(Citation(path, number, target, markers, quotes))
    return citations


def resolve(citation: Citation) -> Path | None:
    """The repository file a citation names, or None when it names none."""
    target = Path(citation.target)
    if target.is_absolute():
        inside = target.resolve().is_relative_to(REPO)
        if inside:
            candidates = [target]
        elif target.parent.name == "docs":
            candidates = [PROJECT_DOCS / target.name]
        else:
            candidates = []
    elif len(target.parts) == 1:
        candidates = [citation.source.parent / target, PROJECT_DOCS / target]
    else:
        candidates = [citation.source.parent / target, REPO / target]
    for candidate in candidates:
        path = candidate.resolve()
        if path.is_file() and path.is_relative_to(REPO):
            return path
    return None


def defines_section(doc_text: str, marker: str) -> bool:
    """Whether a line of the doc starts with `§marker` (after heading/table/list punctuation)."""
    pattern = re.compile(rf"§\s?{re.escape(marker)}(?![0-9A-Za-z]|\.[0-9])")
    return any(pattern.match(_LEADING.sub("", line, count=1)) for line in doc_text.splitlines())


@pytest.fixture(scope="module")
def citations() -> list[Citation]:
    return collect_citations()


# -- the parser on known lines ---------------------------------------------------------------------


def test_parser_reads_targets_sections_and_quoted_names() -> None:
    assert parse_line("intervals (see docs/airflow-3-notes.md §A1).") == [
        ("docs/airflow-3-notes.md", ("A1",), ())
    ]
    assert parse_line(
        '`/x/docs/lightspeed-x-series-api.md` (the "Decisions" section and §3–§8, §10). It'
    ) == [("/x/docs/lightspeed-x-series-api.md", ("3", "4", "5", "6", "7", "8", "10"), ())]
    assert parse_line('(tier-rules.md "Which sales count"); a sale') == [
        ("tier-rules.md", (), ("Which sales count",))
    ]
    assert parse_line('(docs/contracts.md, "The client"; API doc)') == [
        ("docs/contracts.md", (), ("The client",))
    ]
    assert parse_line("See README.md in this folder; also tools/lightspeed_sim/README.md §5.1.") == [
        ("README.md", (), ()),
        ("tools/lightspeed_sim/README.md", ("5.1",), ()),
    ]
    assert parse_line("https://example.org/docs/guide.md and x.mdx and notes.md.bak") == []


def test_sections_are_found_only_where_they_are_defined() -> None:
    doc = "# T\n## §A1 Timetables\n| §11.12 | state |\n- **§B2** GX\nsee §A7 for why\n### §3.3 Open\n"
    assert defines_section(doc, "A1") and defines_section(doc, "11.12") and defines_section(doc, "B2")
    assert defines_section(doc, "3.3")
    assert not defines_section(doc, "A7")  # only mentioned
    assert (
        not defines_section(doc, "A") and not defines_section(doc, "11.1") and not defines_section(doc, "3")
    )


# -- the repository ---------------------------------------------------------------------------------


def test_the_scan_finds_the_citations(citations: list[Citation]) -> None:
    assert citations, "no *.md citation found at all: the scanner is broken"
    assert any(c.source == REPO / "README.md" for c in citations)


def test_every_cited_doc_exists(citations: list[Citation]) -> None:
    missing = [
        f"{c.where} cites {c.target}, which is not in the repository" for c in citations if resolve(c) is None
    ]
    assert not missing, "\n".join(missing)


def test_every_cited_section_exists(citations: list[Citation]) -> None:
    problems = []
    for c in citations:
        doc = resolve(c)
        if doc is None or not (c.markers or c.quotes):
            continue  # a missing doc is the test above's failure
        text = doc.read_text(encoding="utf-8")
        shown = doc.relative_to(REPO)
        problems += [
            f"{c.where} cites {shown} §{m}: no line of it starts with §{m}"
            for m in c.markers
            if not defines_section(text, m)
        ]
        problems += [
            f'{c.where} cites {shown} "{q}": not in it' for q in c.quotes if q.lower() not in text.lower()
        ]
    assert not problems, "\n".join(problems)
