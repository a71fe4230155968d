"""The documentation site builds with no warning (mkdocs --strict); every public name has a heading with its
signature, parameters and returns in the API reference."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chunkcca

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
#: Public names outside chunkcca.__all__: the documented modules' functions and the options.
MODULE_NAMES = ["chunkcca.compat.get_cca_similarity", "chunkcca.compat.compute_pwcca", "chunkcca.compat.fourier_ccas",
                "chunkcca.plot.plot_rho", "chunkcca.plot.plot_frequency_means", "chunkcca.plot.plot_similarity",
                "chunkcca.ingest.ingest", "chunkcca.ingest.load_pickled_array", "chunkcca.record.record",
                "chunkcca.options.StreamOptions", "chunkcca.options.SolveOptions", "chunkcca.measures.Measure"]


@pytest.fixture(scope="module")
def api_page(tmp_path_factory) -> str:
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return (site / "api" / "index.html").read_text()


def _sections(page: str) -> dict[str, str]:
    """Each documented object's heading id → its HTML, up to the next heading of the same level or above."""
    headings = list(re.finditer(r'<h([2-4]) id="([^"]+)" class="doc doc-heading', page))
    return {match.group(2): page[match.start(): headings[i + 1].start() if i + 1 < len(headings) else len(page)]
            for i, match in enumerate(headings)}


def test_mkdocs_build_strict(api_page):
    assert "canonical correlations" in api_page.lower() and "get_cca_similarity" in api_page


def _resolve(name: str) -> tuple[object, set[str]]:
    """The object a public name stands for, and the heading ids it may be documented under (its public path, or
    its defining module's path for names chunkcca re-exports)."""
    module, _, attribute = name.rpartition(".")
    obj = getattr(importlib.import_module(module), attribute)
    return obj, {name, f"{getattr(obj, '__module__', module)}.{attribute}"}


@pytest.mark.parametrize("name", [*(f"chunkcca.{name}" for name in chunkcca.__all__ if name != "MEASURES"),
                                  "chunkcca.measures.MEASURES", *MODULE_NAMES])
def test_every_public_name_has_a_heading_signature_and_sections(api_page, name):
    sections = _sections(api_page)
    obj, ids = _resolve(name)
    found = [sections[heading] for heading in ids if heading in sections]
    assert found, f"{name} has no heading in the API reference"
    if callable(obj) and not isinstance(obj, type):
        assert "doc-signature" in found[0], f"{name} shows no signature"
        if inspect.signature(obj).parameters:
            assert "Parameters:" in found[0], f"{name} has no Parameters section"
        if inspect.signature(obj).return_annotation not in ("None", None):
            assert "Returns:" in found[0], f"{name} has no Returns section"


def test_no_sphinx_roles_left_as_text(api_page):
    assert not re.search(r":(func|class|meth|mod|data|attr):`", api_page)
