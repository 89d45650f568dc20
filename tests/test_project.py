"""The README's Quickstart and CI stay true to each other; the docs site and the README's links hold together."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "examples/llm_reweighting/run_reweighting.py" in commands[0]  # the main job
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "README.md" in ci


def test_the_docs_site_lists_every_page_and_every_link_resolves():
    """mkdocs.yml's nav names every page of docs/ (and only those), the site's home is the README, and every
    relative link of the README and the docs pages points at a file that exists."""
    nav = re.findall(r"^ +- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages
    readme = (ROOT / "README.md").read_text()
    home = (ROOT / "docs" / "index.md").read_text().split("\n", 1)[1]
    assert home == readme.replace("](docs/", "]("), (
        "docs/index.md (the site's home) must be the README with 'docs/' dropped from its links, under its first "
        "line: copy README.md there again after changing it"
    )
    for page in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
        for target in re.findall(r"\[[^\]\n]*\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
