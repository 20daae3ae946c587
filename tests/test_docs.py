"""The design documents in docs/ and every pointer to a Markdown file.

1. A reference to a Markdown file anywhere in the sources, configs, tests, experiments, benchmarks and docs must
   resolve to a file inside the repository, relative to the repository root or to the citing file's folder.
   What counts as a reference (:func:`find_references`): the target of a Markdown link, a path with a folder
   (``docs/hsrm.md``, ``../data/README.md``), a bare file name in capitals (``README.md``), each optionally followed
   by a section sign and a number, and a document name in capitals followed by a section sign and a number (read
   as that name plus ".md"). Lower-case bare file names in examples (an ``--out`` argument, say) are
   not references; URLs are not checked.
2. Each design document exists and has its sections, in order.
3. What the documents cite from the repository (paths under src/, conf/, tests/, ...; test names) exists, so a
   document that falls behind the code fails here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED_DIRS = ("src", "conf", "experiments", "tests", "benchmarks", "docs")
SCANNED_FILES = ("README.md", "data/README.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".cfg", ".ini"}

MD = r"\.md(?![\w-])"  # a name ending in .md (not .mdx, not .md-foo)
SECTION = r"(?:[ \t]*§[ \t]*(\d+))?"
_LINK = re.compile(r"\]\(\s*([^)\s#]+" + MD + r")(?:#[^)\s]*)?\s*\)" + SECTION)
_PATH = re.compile(r"(?<![\w./:-])((?:\.{1,2}/|/)?[\w.-]+(?:/[\w.-]+)*/[\w.-]+" + MD + ")" + SECTION)
_CAPS = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_-]*" + MD + ")" + SECTION)
_CAPS_SECTION = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_-]+)[ \t]*§[ \t]*(\d+)")

# Each design document and its sections in order (the code and the other documents point into them).
HEADINGS = {
    "README.md": ["## Documents", "## Layers at a glance", "## Reading order"],
    "grad_eclip.md": [
        "## Notation",
        "## Native mode",
        "## Official mode",
        "## Multi-layer",
        "## Text side",
        "## Batching",
        "## open_clip specifics",
    ],
    "hsrm.md": [
        "## Inputs",
        "## Multi-scale relationships",
        "## Adaptive weighting",
        "## Cross-modal alignment",
        "## Map and initialisation",
        "## Objectives",
        "## Training and caching",
        "## What is reconstructed",
    ],
    "shapes_world.md": [
        "## Why it exists",
        "## Generator",
        "## Formats",
        "## MANIFEST",
        "## The tiny CLIP",
        "## Quality gates",
    ],
    "contracts.md": [
        "## Backbone",
        "## Explainers",
        "## HSRM",
        "## Metrics",
        "## Data",
        "## Shapes world",
        "## Command lines",
        "## Run directories",
    ],
    "metrics.md": [
        "## Maps and boxes",
        "## Pointing game",
        "## Energy pointing game",
        "## IoU",
        "## Deletion and insertion",
        "## Tolerances and scale",
        "## Frames",
    ],
    "architecture.md": ["## Layers", "## Naming upwards: lazy dotted paths", "## The contract"],
    "towers.md": [
        "## Which models are towers",
        "## The traced forward",
        "## The score",
        "## Reading each method through the pooling query",
        "## Refused methods",
        "## Agreement with legrad-torch",
        "## Measurements",
        "## API",
    ],
}


@dataclass(frozen=True)
class Reference:
    """One pointer to a Markdown file: where it is (file relative to the root, line) and what it names."""

    file: str
    line: int
    target: str
    section: str | None

    def __str__(self) -> str:
        section = f" §{self.section}" if self.section else ""
        return f"{self.file}:{self.line}: {self.target}{section}"


def find_references(text: str, file: str = "<text>") -> list[Reference]:
    """Every Markdown-file reference in ``text`` (see the module docstring for what counts), in line order."""
    refs: list[Reference] = []
    for n, line in enumerate(text.splitlines(), start=1):
        found: dict[int, Reference] = {}  # by start column: one reference per place even when two patterns match
        for pattern in (_LINK, _PATH, _CAPS):
            for m in pattern.finditer(line):
                if not _is_url(line, m.start(1)):
                    found.setdefault(m.start(1), Reference(file, n, m.group(1), m.group(2)))
        for m in _CAPS_SECTION.finditer(line):
            found.setdefault(m.start(1), Reference(file, n, m.group(1) + ".md", m.group(2)))
        refs.extend(found[k] for k in sorted(found))
    return refs


def _is_url(line: str, start: int) -> bool:
    """True when the match starting at ``start`` is part of a URL (``scheme://...`` without spaces before it)."""
    head = line[:start]
    word = re.split(r"[\s(<\[\"'`]", head)[-1]
    return "://" in word


def resolves(ref: Reference, root: Path) -> bool:
    """The target exists as a file inside ``root``, relative to the root or to the citing file's folder."""
    root = root.resolve()
    if ref.target.startswith("/"):
        candidates = [Path(ref.target)]  # absolute: only valid if it happens to point into the repository
    else:
        candidates = [root / ref.target, (root / ref.file).parent / ref.target]
    return any(p.resolve().is_file() and p.resolve().is_relative_to(root) for p in candidates)


def scanned_files(root: Path) -> list[Path]:
    """The text files whose references are checked."""
    files = [root / f for f in SCANNED_FILES if (root / f).is_file()]
    for d in SCANNED_DIRS:
        for p in sorted((root / d).rglob("*")) if (root / d).is_dir() else []:
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts:
                files.append(p)
    return files


def dangling(root: Path, files: list[Path] | None = None) -> list[Reference]:
    """References in ``files`` (default: :func:`scanned_files`) that do not resolve."""
    out = []
    for p in files if files is not None else scanned_files(root):
        text = p.read_text(encoding="utf-8", errors="replace")
        out += [r for r in find_references(text, p.relative_to(root).as_posix()) if not resolves(r, root)]
    return out


def _md(name: str) -> str:
    """``name`` + ".md", spelt so that this file's own examples are not references to missing files."""
    return name + ".md"


# ------------------------------------------------------------------------------------------ the finder itself
def test_finder_recognises_references_and_ignores_file_names_and_urls():
    text = "\n".join(
        [
            f"see docs/{_md('hsrm')} §2 and data/{_md('README')}, also [g](../docs/{_md('grad_eclip')}#notation)",
            f"{_md('NOTES')} §4 and {'SPEC'} §3 and a plain {_md('CHANGELOG')}",
            f"python aggregate.py --out {_md('table')}   https://github.com/o/r/blob/main/{_md('README')}",
        ]
    )
    got = [(r.line, r.target, r.section) for r in find_references(text)]
    assert got == [
        (1, "docs/" + _md("hsrm"), "2"),
        (1, "data/" + _md("README"), None),
        (1, "../docs/" + _md("grad_eclip"), None),
        (2, _md("NOTES"), "4"),
        (2, _md("SPEC"), "3"),
        (2, _md("CHANGELOG"), None),
    ]


def test_dangling_finds_missing_targets_and_accepts_root_or_folder_relative_ones(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / _md("a")).write_text(f"[b]({_md('b')}) docs/{_md('b')} ../{_md('README')} {_md('GONE')} §1\n")
    (tmp_path / "docs" / _md("b")).write_text("# b\n")
    (tmp_path / _md("README")).write_text(f"docs/{_md('a')} and /etc/{_md('NOPE')}\n")
    files = [tmp_path / "docs" / _md("a"), tmp_path / _md("README")]
    assert [(r.file, r.target, r.section) for r in dangling(tmp_path, files)] == [
        ("docs/" + _md("a"), _md("GONE"), "1"),
        (_md("README"), "/etc/" + _md("NOPE"), None),  # absolute paths never count as inside the repository
    ]


# ------------------------------------------------------------------------------------------ the repository
def test_docs_and_readmes_reference_only_existing_files():
    files = [p for p in scanned_files(ROOT) if p.is_relative_to(DOCS) or p.name == "README.md"]
    bad = dangling(ROOT, files)
    print("\n".join(map(str, bad)))
    assert not bad, "dangling Markdown references:\n" + "\n".join(map(str, bad))


def test_every_markdown_reference_in_the_repository_resolves():
    bad = dangling(ROOT)
    print("\n".join(map(str, bad)))
    assert not bad, "dangling Markdown references:\n" + "\n".join(map(str, bad))


@pytest.mark.parametrize("name", sorted(HEADINGS))
def test_design_document_exists_with_its_sections_in_order(name):
    path = DOCS / name
    assert path.is_file(), f"missing design document {path.relative_to(ROOT)}"
    lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines and lines[0].startswith("# "), f"{name}: the first line should be its title ('# ...')"
    positions = []
    for heading in HEADINGS[name]:
        assert heading in lines, f"{name}: no section '{heading}'"
        positions.append(lines.index(heading))
    assert positions == sorted(positions), f"{name}: sections out of order, expected {HEADINGS[name]}"


def test_docs_index_lists_every_design_document():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = {r.target for r in find_references(index)}
    missing = sorted(n for n in HEADINGS if n != "README.md" and n not in linked)
    assert not missing, f"docs/README.md does not link {missing}"


_REPO_PATH = re.compile(r"`((?:src|conf|tests|benchmarks|experiments)/[\w./-]+)`")
_TEST_NAME = re.compile(r"`(test_\w+)`")


def test_paths_and_tests_cited_by_the_docs_exist():
    defined = set()
    for p in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", p.read_text(encoding="utf-8"), flags=re.M))
    missing = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        missing += [f"{doc.name}: {p}" for p in _REPO_PATH.findall(text) if not (ROOT / p).exists()]
        missing += [f"{doc.name}: {t}" for t in _TEST_NAME.findall(text) if t not in defined]
    assert not missing, "the docs cite what the repository does not hold:\n" + "\n".join(missing)
