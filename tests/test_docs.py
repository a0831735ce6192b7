"""The README and the docs/ pages: every relative link resolves (files and #anchors), the README
stays short, and every densepure-rt command of their ```bash blocks is a valid command line of
today's CLI (command, flags and values parsed by click, nothing run: blocks that need checkpoints or
a GPU are checked the same way)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from densepure_rt.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
#: Values for the shell variables of the blocks (the digits experiment's loop variable).
VARIABLES = {"sigma": "0.5"}


def prose(text: str) -> str:
    """The page without its fenced code blocks (their `#` lines are comments, not headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, every character but
    letters, digits, '_', '-' and spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def test_the_github_slug_rule_on_known_headings():
    assert slug("Fused GPU kernels (`build --device cuda`, `certify --kernels fused`)") == \
        "fused-gpu-kernels-build---device-cuda-certify---kernels-fused"
    assert slug("7. The GPU runtime (how the lean runtime reaches the GPU)") == "7-the-gpu-runtime-how-the-lean-runtime-reaches-the-gpu"
    assert slug("Results: the digits experiment") == "results-the-digits-experiment"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md") if t.partition("#")[0]}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in targets]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_readme_is_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move the details into a docs/ page"


def shell_commands(block: str) -> list[str]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, lists
    (`&&`, `||`, `;`, `|`) split, variables replaced by a value."""
    text = re.sub(r"\s*\\\n\s*", " ", block)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES.get(m.group(1), "1"), line)
        commands += [part.strip() for part in re.split(r"&&|\|\||;|\|", line) if part.strip()]
    return commands


def densepure_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M):
            found += [(str(page.relative_to(ROOT)), c) for c in shell_commands(block) if c.startswith("densepure-rt")]
    return found


def test_the_shell_splitter_on_a_loop_and_a_list():
    block = "for sigma in 0.25 0.5; do\n  densepure-rt certify --sigma $sigma \\\n    --out d/x$sigma.tsv   # note\ndone\na && densepure-rt info e\n"
    assert shell_commands(block) == ["for sigma in 0.25 0.5", "do", "densepure-rt certify --sigma 0.5 --out d/x0.5.tsv", "done",
                                     "a", "densepure-rt info e"]


def test_the_pages_show_the_commands_of_every_mode():
    commands = [c for _, c in densepure_commands()]
    for words in ("densepure-rt certify", "--radius", "--tol", "densepure-rt predict", "densepure-rt report",
                  "densepure-rt build", "densepure-rt info", "--device cuda", "--ray"):
        assert any(words in c for c in commands), words


def test_the_check_refuses_an_unknown_flag_a_bad_value_and_a_missing_option():
    certify = main.commands["certify"]
    for args in (["--sigma", "0.5", "--no-such-flag"], ["--sigma", "0.5", "--device", "tpu"], ["--sigma", "0.5", "--votes", "0"],
                 ["--steps", "4"]):
        with pytest.raises(click.ClickException):
            certify.make_context("certify", args)
    certify.make_context("certify", ["--sigma", "0.5", "--out", "x.tsv"])


@pytest.mark.parametrize("where,command", densepure_commands(), ids=lambda x: x if isinstance(x, str) and x.endswith(".md") else "")
def test_every_densepure_rt_command_in_the_docs_parses(where, command):
    """Each command's name, flags and values as click parses them (types, ranges, choices, required
    options, no stray arguments); the command itself is not run."""
    words = shlex.split(command)[1:]
    assert words, f"{where}: a bare densepure-rt"
    name, args = words[0], words[1:]
    assert name in main.commands, f"{where}: no command {name!r}: {command}"
    try:
        main.commands[name].make_context(name, args)
    except click.ClickException as exc:
        pytest.fail(f"{where}: {command}\n  {exc.format_message()}")


def test_every_results_file_the_pages_cite_exists():
    """Every ``benchmarks/results/...`` path the README and the docs pages name (a file, a folder, or
    a glob such as ``radius_*.tsv``) is in the repository: each figure traces to a recorded result."""
    cited = set()
    for page in PAGES:
        cited |= {(page.name, m) for m in re.findall(r"benchmarks/results(?:/[\w.*\-]+)*/?", page.read_text(encoding="utf-8"))}
    assert len(cited) > 20  # the pages do cite their results
    missing = [f"{name}: {path}" for name, path in sorted(cited) if not list(ROOT.glob(path.rstrip("/")))]
    assert not missing, "\n".join(missing)
