"""The README and docs/ as tests: every fenced code block runs as written, unless it is marked as a
template (fence info ```` ```bash template ```` or ```` ```python template ````, or `<!-- template -->`
on the line before the fence): placeholder paths, GPU-only commands and long runs.

Blocks run from the repository root with the cache in a temporary folder and one thread, so that the
whole file takes well under a minute on a shared 2-core machine."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python", "bash"}
NOT_CODE = {"text"}  # file trees and the like: nothing to run
# Blocks that are neither quick nor marked template, by (page, first line): reason. Keep it small;
# marking the block as a template is usually the better fix.
SKIP: dict[tuple[str, str], str] = {}
# Commands too long (or too heavy) for a docs test; a runnable bash block must not contain them.
LONG = re.compile(r"\bmake (env|test|figures|lab|gpu-check)\b|\btorchrun\b|\bpapermill\b|\bpip install\b")
# Words the docs must not use: they are the project's own pages, not notes about how they were made.
FORBIDDEN = (re.compile(r"DESIGN\.md"), re.compile(r"\bissue ", re.I), re.compile(r"shared notes", re.I))
BLOCK_TIMEOUT_S = 180


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    template: bool
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.lang}"


def read_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        info = lines[i][3:].split()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: unclosed code fence"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        template = "template" in info[1:] or before == "<!-- template -->"
        out.append(Block(str(path.relative_to(ROOT)), i + 1, info[0] if info else "", template,
                         "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in read_blocks(page)]
TO_RUN = [b for b in BLOCKS if b.lang in RUNNABLE and not b.template
          and (b.page, b.code.splitlines()[0]) not in SKIP]
_RESULTS: dict[str, subprocess.CompletedProcess] = {}


@pytest.fixture(scope="module")
def run_block(tmp_path_factory):
    """Runs a block once (later calls reuse the result) with the cache in a temporary folder."""
    cache = tmp_path_factory.mktemp("snlp_cache")
    venv_bin = str(Path(sys.executable).parent)  # `python` in a bash block is this interpreter
    env = dict(os.environ, SNLP_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""), MPLBACKEND="Agg")

    def run(block: Block) -> subprocess.CompletedProcess:
        if block.id not in _RESULTS:
            if block.lang == "python":
                cmd = [sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + block.code]
            else:
                cmd = ["bash", "-euo", "pipefail", "-c", block.code]
            _RESULTS[block.id] = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                                timeout=BLOCK_TIMEOUT_S)
        return _RESULTS[block.id]
    return run


@pytest.mark.parametrize("block", TO_RUN, ids=lambda b: b.id)
def test_block_runs_as_written(block, run_block):
    res = run_block(block)
    assert res.returncode == 0, f"{block.id} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def test_every_block_is_runnable_text_or_template():
    assert len(TO_RUN) >= 4, "the docs should hold some examples that run"
    for b in BLOCKS:
        assert b.lang in RUNNABLE | NOT_CODE, f"{b.id}: fence language must be one of {RUNNABLE | NOT_CODE}"
        if b.lang == "bash" and not b.template and (b.page, b.code.splitlines()[0]) not in SKIP:
            assert not LONG.search(b.code), f"{b.id}: a long command; mark the block as a template"
    firsts = {(b.page, b.code.splitlines()[0]) for b in BLOCKS}
    assert set(SKIP) <= firsts, f"SKIP names blocks that no longer exist: {set(SKIP) - firsts}"


def test_readme_solve_example_shows_finite_termination(run_block):
    block = next(b for b in TO_RUN if b.page == "README.md" and "snlp_lab.solve(" in b.code)
    res = run_block(block)
    assert res.returncode == 0, res.stderr[-3000:]
    err = {m[0]: float(m[1]) for m in re.findall(r"idn K=(\d+) chunks=None: relative error of h_L (\S+)", res.stdout)}
    assert set(err) == {"1", "2", "8"}, res.stdout
    assert err["8"] < 1e-4, "K = n_par must give the sequential trace up to rounding"
    assert err["1"] > err["2"] > 1e-3, "the example's layers should do something, and K=2 beat K=1"


def test_readme_is_short_and_opens_with_a_figure():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail to docs/"
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", "\n".join(lines[:30]))
    assert images, "the README's first screen should show the headline figure"
    assert all((ROOT / img).is_file() for img in images), images


def test_no_forbidden_words():
    for page in PAGES:
        text = page.read_text()
        for word in FORBIDDEN:
            assert not word.search(text), f"{page.name} mentions {word.pattern!r}"


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name}: broken link {target}"


def test_design_keeps_its_section_numbers():
    # code comments cite `docs/design.md §N`
    heads = re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), re.M)
    assert heads[:4] == ["1", "2", "3", "4"], heads


def _rows(text: str) -> dict[str, list[str]]:
    """Claim letter -> cells of its table row."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*\(([a-h])\)\s*\|", line)
        if m:
            rows[m[1]] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def test_readme_claims_match_the_ledger():
    """The README's summary copies verdicts and numbers from reports/claims.md, never its own: a make figures
    run that changes the ledger updates the summary in the same commit."""
    ledger = _rows((ROOT / "reports" / "claims.md").read_text())
    readme = _rows((ROOT / "README.md").read_text())
    assert set(readme) == set(ledger) == set("abcdefgh")
    number = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
    for key, cells in readme.items():
        verdict = re.match(r"\*\*(.+?)\*\*", ledger[key][4])[1]
        assert cells[-1] == verdict, f"({key}): README says {cells[-1]!r}, the ledger {verdict!r}; update the README's summary"
        row = " ".join(ledger[key])
        missing = [n for n in number.findall(cells[2]) if n not in row]
        assert not missing, f"({key}): numbers not in the ledger: {missing}"
