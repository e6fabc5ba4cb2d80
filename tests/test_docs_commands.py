"""Every command README.md and docs/*.md show still works, so the docs cannot rot.

A command is a line of a fenced code block that starts with `python -m dwbench` (or
`.venv/bin/python -m dwbench`), backslash continuations joined, a trailing `# comment` dropped,
`$VARIABLES` expanded from the assignments before it in the same block (or from DOC_VARIABLES).
Each is checked without running anything:

- `python -m dwbench [-m] <overrides>`: Hydra composes the overrides and dwbench checks the
  config as a run does before any work (with `-m`: the sweep's cells);
- `python -m dwbench.<module> <args>`: the module's `parser()` parses the arguments; the Hydra
  overrides that a module takes (`sweep.plan`, `sweep.status`, `report`) are composed too.

A block whose fence is preceded by the line `<!-- doc-test: run -->` is also run, in a scratch
folder with a copy of the committed `results/*.csv`: only commands that take seconds and load no
model are marked so. Relative links between the pages, and the headings they point at, must
resolve.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from importlib import import_module
from pathlib import Path

import pytest
from hydra import initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_MARK = "<!-- doc-test: run -->"
COMMAND = re.compile(r"^(?:\.venv/bin/)?python -m (dwbench(?:\.\w+)*)(?=\s|$)")
ASSIGNMENT = re.compile(r"^(?:export )?([A-Za-z_]\w*)=(.*)$")
VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")
# Variables a block uses but another block of the same page defines.
DOC_VARIABLES = {
    # docs/slurm.md, "A SLURM on this machine": this machine's size, used by the sharded chain
    "SMALL": "slurm.cpus_per_task=2 slurm.mem_gb=8 slurm.parallel=1",
}
# docs/compare-your-method.md runs from a folder holding the method package and config folder
# its own code blocks define; $PWD is left in the command until the test writes that folder.
OWN_METHOD_PAGE = REPO / "docs" / "compare-your-method.md"
# Modules that take Hydra overrides positionally, and how they become sweep overrides.
OVERRIDE_MODULES = ("dwbench.sweep.plan", "dwbench.sweep.status", "dwbench.report")


@dataclass(frozen=True)
class DocCommand:
    page: Path
    line: int
    module: str
    text: str  # the command after `python -m <module>`, variables expanded but for $PWD
    run: bool

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def _expand(text: str, variables: dict[str, str]) -> str:
    """Shell expansion of the variables known; $PWD and unknown ones are left as written."""
    return VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def _unquote(value: str) -> str:
    parts = shlex.split(value, comments=True)
    return parts[0] if len(parts) == 1 else value


def _blocks(page: Path) -> list[tuple[int, list[str], bool]]:
    """(line number of the first line, lines, marked to run) of each fenced block."""
    blocks: list[tuple[int, list[str], bool]] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("```"):
            before = next((ln for ln in reversed(lines[:index]) if ln.strip()), "")
            start, index = index + 1, index + 1
            while index < len(lines) and not lines[index].startswith("```"):
                index += 1
            blocks.append((start + 1, lines[start:index], before.strip() == RUN_MARK))
        index += 1
    return blocks


def extract(page: Path) -> list[DocCommand]:
    commands: list[DocCommand] = []
    for first, lines, run in _blocks(page):
        variables = dict(DOC_VARIABLES)
        index = 0
        while index < len(lines):
            number, text = first + index, lines[index]
            while text.endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text[:-1] + " " + lines[index].strip()
            index += 1
            assignment = ASSIGNMENT.match(text.strip())
            if assignment:
                name, value = assignment.groups()
                variables[name] = _unquote(_expand(value, variables))
                continue
            match = COMMAND.match(text.strip())
            if match:
                rest = text.strip()[match.end() :]
                commands.append(
                    DocCommand(page, number, match.group(1), _expand(rest, variables), run)
                )
    return commands


COMMANDS = [command for page in PAGES for command in extract(page)]


def test_the_docs_show_commands_of_every_kind() -> None:
    """Guards the extractor: a broken one would otherwise check nothing and pass."""
    modules = {c.module for c in COMMANDS}
    assert len(COMMANDS) >= 50, [str(c) for c in COMMANDS]
    assert {"dwbench", "dwbench.bench", "dwbench.report", "dwbench.sweep.plan"} <= modules
    assert any(c.run for c in COMMANDS)
    readme = [c for c in COMMANDS if c.page.name == "README.md"]
    assert any("+experiment=gsm8k_10pct" in c.text for c in readme)


def _hydra_args(args: list[str], page_dir: Path) -> tuple[bool, list[str]]:
    """(multirun, overrides) of `python -m dwbench <args>`; refuses a flag the docs misspell."""
    multirun, overrides = False, []
    words = iter(args)
    for word in words:
        if word in ("-m", "--multirun"):
            multirun = True
        elif word in ("--cfg", "-c"):
            next(words)
        elif word in ("--help", "-h"):
            continue
        elif word in ("--config-dir", "-cd"):
            overrides.append(f"hydra.searchpath=[file://{page_dir / next(words)}]")
        elif word.startswith("-"):
            raise AssertionError(f"python -m dwbench does not take {word}")
        else:
            overrides.append(word)
    return multirun, overrides


@cache
def _compose_sweep(overrides: tuple[str, ...]) -> tuple[int, int]:
    """(cells, cells composed) of the sweep `python -m dwbench -m <overrides>` would run.

    The grid is expanded by dwbench's own load_sweep. Composing all 567 cells of `table2` takes
    a minute, so each cell is composed and checked only if it brings an override no earlier cell
    had: every value of every axis is checked in at least one cell.
    """
    from dwbench.sweep import grid

    seen: set[str] = set()
    composed = 0
    real = grid.checked_cell

    def checked_when_new(cell_overrides: list[str], place: str) -> grid.Cell:
        nonlocal composed
        if set(cell_overrides) <= seen:
            return grid.Cell(cell_overrides, None, "")  # type: ignore[arg-type]
        seen.update(cell_overrides)
        composed += 1
        return real(cell_overrides, place)

    grid.checked_cell = checked_when_new
    try:
        sweep = grid.load_sweep(list(overrides), progress=False)
    finally:
        grid.checked_cell = real
    return len(sweep.cells), composed


def _compose_run(overrides: list[str]) -> None:
    """The one cell `python -m dwbench <overrides>` runs, checked as the run checks it."""
    from dwbench.sweep import grid

    with initialize_config_dir(config_dir=str(grid.CONF_DIR), version_base="1.3"):
        grid.checked_cell(overrides, "the documented command")


def _parser(module: str):
    """The module's `parser()`; a package's may live in its `__main__`."""
    try:
        imported = import_module(module)
    except ModuleNotFoundError as error:
        raise AssertionError(f"{module} does not exist (see CHANGELOG.md): {error}") from None
    if not hasattr(imported, "parser") and hasattr(imported, "__path__"):
        with contextlib.suppress(ModuleNotFoundError):
            imported = import_module(f"{module}.__main__")
    assert hasattr(imported, "parser"), f"{module} has no parser() to check its commands with"
    return imported.parser()


def _parse(module: str, args: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return vars(_parser(module).parse_args(args))
        except SystemExit as exit_:
            assert exit_.code in (0, None), f"{module} refused {args}: {err.getvalue()}"
            return {}  # --help


def _own_method_folder(root: Path) -> Path:
    """compare-your-method.md's package and config folder, at the paths its blocks name."""
    for _, lines, _ in _blocks(OWN_METHOD_PAGE):
        if lines and re.match(r"# (my_selection|my_conf)/\S+\.(py|yaml)", lines[0]):
            path = root / lines[0].removeprefix("# ").split()[0].rstrip(":")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
    (root / "my_selection" / "__init__.py").write_text("")
    return root


@pytest.fixture
def page_dir(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The folder a page's commands run from ($PWD): the repository, or for
    compare-your-method.md a folder with its method package on sys.path."""
    command: DocCommand = request.param
    if command.page != OWN_METHOD_PAGE:
        return REPO
    root = _own_method_folder(tmp_path / "mine")
    monkeypatch.syspath_prepend(str(root))
    return root


def _scratch(tmp_path: Path) -> Path:
    scratch = tmp_path / "scratch"
    (scratch / "results").mkdir(parents=True)
    for snapshot in (REPO / "results").glob("*.csv"):
        shutil.copy(snapshot, scratch / "results")
    return scratch


@pytest.mark.parametrize(
    ("command", "page_dir"),
    [pytest.param(c, c, id=str(c)) for c in COMMANDS],
    indirect=["page_dir"],
)
def test_documented_command_works(command: DocCommand, page_dir: Path, tmp_path: Path) -> None:
    text = command.text.replace("$PWD", str(page_dir))
    unexpanded = VARIABLE.findall(text)
    assert not unexpanded, f"{command}: ${unexpanded[0]} is not defined in its block"
    args = shlex.split(text, comments=True)
    if command.module == "dwbench":
        multirun, overrides = _hydra_args(args, page_dir)
        if multirun:
            cells, _ = _compose_sweep(tuple(overrides))
            assert cells > 0, f"{command}: the sweep has no cells"
        else:
            _compose_run(overrides)
    else:
        parsed = _parse(command.module, args)
        if command.module in OVERRIDE_MODULES and parsed:
            overrides = list(parsed.get("overrides", []))
            if "experiment" in parsed:
                overrides.insert(0, f"+experiment={parsed['experiment']}")
            cells, _ = _compose_sweep(tuple(overrides))
            assert cells > 0, f"{command}: the sweep has no cells"
    if command.run:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(page_dir)])}
        done = subprocess.run(
            [sys.executable, "-m", command.module, *args],
            cwd=_scratch(tmp_path),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-3000:]}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    in_fence, anchors = False, set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("dwbench", "method=data_whispere"),  # no such method
        ("dwbench", "method=data_whisperer method.n_demo=5"),  # no such key
        ("dwbench", "-m +experiment=embedded_table2 budget=0.1,2"),  # a budget outside (0, 1]
        ("dwbench", "--config-name other"),  # a flag the check does not know
        ("dwbench.bench", "selection --pool-sizez 64"),  # a misspelt flag
    ],
)
def test_a_broken_command_fails_its_check(module: str, text: str) -> None:
    """The checks are not vacuous: what a reader's copy-paste would refuse, they refuse."""
    broken = DocCommand(REPO / "README.md", 0, module, text, run=False)
    with pytest.raises(Exception):  # noqa: B017 (any refusal will do)
        test_documented_command_works(broken, REPO, Path("unused"))
