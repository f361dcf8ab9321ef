"""Every preset: at least 24, each with a source, a formula shown by `opd methods`, its provenance tags
explained, and a formula test (tests/test_presets_route1.py, tests/test_presets_route2.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from opd.config.docs import format_methods
from opd.config.presets import PRESETS
from tests import test_presets_recent, test_presets_route1, test_presets_route2

ROOT = Path(__file__).resolve().parent.parent


def test_at_least_24_presets_each_with_a_formula_test():
    assert len(PRESETS) >= 24
    tested = set(test_presets_route1.HAND) | set(test_presets_route2.HAND) | set(test_presets_recent.HAND)
    assert tested == set(PRESETS), f"presets without a formula test: {sorted(set(PRESETS) - tested)}"


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_cites_a_paper_or_code_and_states_its_formula(name):
    preset = PRESETS[name]
    assert re.search(r"arXiv \d{4}\.\d{4,5}|https?://", preset.citation), preset.citation
    assert "reference/" not in preset.citation and "performance.md" not in preset.citation  # never notes outside the repo
    assert len(preset.formula) > 20 and ("L =" in preset.formula or "A_t" in preset.formula)
    block = format_methods().split(f"\n{name}\n")[1].split("\n\n")[0]
    assert "formula: " in block and "source: " in block


def test_methods_listing_explains_the_provenance_tags():
    text = format_methods()
    head = text.split("\n\n")[0]
    assert f"({len(PRESETS)})" in head and "[INFER]" in head and "[MEMORY]" in head
    assert "docs/methods.md §0" in head
    for preset in PRESETS.values():  # a tag used by a preset is one the header explains
        for tag in re.findall(r"\[([A-Z]+)\]", preset.notes + preset.formula + preset.citation):
            assert tag in ("INFER", "MEMORY"), (preset.name, tag)


def test_docs_methods_catalogues_every_preset_with_its_formula_and_source():
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    for name, preset in PRESETS.items():
        entry = text.split(f"#### `{name}`\n", 1)
        assert len(entry) == 2, f"docs/methods.md has no entry for {name}"
        body = entry[1].split("\n#### ", 1)[0]
        assert preset.formula in body and preset.citation in body, name
        assert f"| `{name}` |" in text  # and a row in the table of §5


def test_every_methods_md_reference_names_a_section_that_exists():
    """Code, tests, docs and benches cite docs/methods.md §X (never a file outside the repository), and
    every §X they cite is a heading of docs/methods.md."""
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))
    assert {"0", "1", "2", "3", "4", "5"} <= headings and {f"3.{i}" for i in range(1, 11)} <= headings
    assert {f"4.{i}" for i in range(1, 9)} <= headings
    for folder in ("opd", "tests", "docs", "bench"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".md") or path.name == "methods.md" or path == Path(__file__).resolve():
                continue
            source = path.read_text(encoding="utf-8", errors="replace")
            assert not re.search(r"(?<!docs/)methods\.md", source), f"{path}: cite docs/methods.md"
            for ref in re.findall(r"docs/methods\.md ((?:§[\d.]+[–, ]*)+)", source):
                for number in re.findall(r"§(\d+(?:\.\d+)?)", ref):
                    assert number in headings, f"{path}: docs/methods.md §{number} does not exist"
