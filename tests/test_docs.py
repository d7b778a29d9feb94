"""The repository carries what its code and docs refer to: nothing names the working notes outside
it, the README stays short, and its relative links resolve. (mkdocs build --strict, in CI, checks
the links inside docs/.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# built here so that this file does not match itself
OUTSIDE = re.compile("shared" + "/|" + "DESIGN" + r"\.md")


def test_nothing_points_outside_the_repository():
    paths = [ROOT / "README.md", ROOT / "mkdocs.yml"]
    for d in ("docs", "fasp_ext", "bench", "tests", "scripts", "csrc", ".ci"):
        paths += [p for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix not in (".png", ".so", ".pyc")]
    hits = []
    for p in paths:
        try:
            text = p.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{p.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, hits


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links, "the README links into docs/"
    missing = [t for t in links if "://" not in t and not (ROOT / t).exists()]
    assert not missing, missing
