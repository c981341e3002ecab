"""Packaging: the distribution's name and extras, its files, and the command line after a plain install (no rich,
no matplotlib, no transformers), each missing package made unimportable in a subprocess."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import leetdecoding as ld
from leetdecoding import extras
from leetdecoding.bench import plain
from leetdecoding.bench.report import availability
from leetdecoding.cli import build_parser
from leetdecoding.cli_help import shows_default
from leetdecoding.methods import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = ("rich", "matplotlib", "transformers")

# Run in a subprocess: the modules named in argv[1] (comma list) cannot be imported, as after a plain install.
BLOCKED = """
import sys
blocked = set(filter(None, sys.argv[1].split(",")))

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in blocked else _find_spec(name, *a)
"""


def run_blocked(blocked: tuple[str, ...], code: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "LEETDECODING_TUNING": "off"}
    argv = [sys.executable, "-c", BLOCKED + code, ",".join(blocked)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def cli(blocked: tuple[str, ...], *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    return run_blocked(blocked, f"from leetdecoding.cli import main; sys.exit(main({list(args)!r}))", columns)


# ----- the distribution -----


def test_the_distribution_has_its_own_name_and_the_readme_says_both():
    assert PROJECT["name"] == extras.DISTRIBUTION != "leetdecoding"
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {extras.DISTRIBUTION}" in readme or f"pip install '{extras.DISTRIBUTION}" in readme
    assert "import leetdecoding" in readme
    for extra in ("cli", "bench", "hf", "triton", "test"):
        assert extra in PROJECT["optional-dependencies"], extra
        assert f"[{extra}]" in readme, extra


def test_the_version_has_one_source():
    assert "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "leetdecoding.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ld.__version__)
    assert f"## {ld.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_license_and_py_typed_ship():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "leetdecoding" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["leetdecoding"]


def _third_party_imports() -> set[str]:
    """The top-level modules that leetdecoding's files import, less the standard library and itself."""
    found = set()
    for path in (ROOT / "leetdecoding").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"leetdecoding"}


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def test_every_dependency_is_imported_and_every_import_is_a_dependency():
    core = _names(PROJECT["dependencies"])
    optional = set().union(*(_names(r) for r in PROJECT["optional-dependencies"].values()))
    imported = _third_party_imports()
    assert core <= imported, f"core dependencies nothing imports: {core - imported}"
    assert imported <= core | optional, f"imported, but no dependency brings it: {imported - core - optional}"
    assert core == {"torch", "numpy"}  # the plain install: everything else is an extra


# ----- the command line -----


def test_version():
    done = cli((), "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"leetdecoding {ld.__version__} ({extras.DISTRIBUTION})"


def test_every_help_shows_the_defaults():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())  # argparse wraps at the terminal's width
        for action in sub._actions:
            default = action.default
            if shows_default(action):
                shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
                assert f"default: {shown})" in text, (name, action.dest)


def _words_of_info() -> set[str]:
    """Every word the methods table holds: each must appear whole in `info`'s output."""
    words = set()
    for m in ld.list_methods():
        cells = [m["name"], m["operation"], m["backend"], *m["devices"], *m["dtypes"], m["time"], m["memory"]]
        words |= {w for c in cells for w in c.split()}
        words |= set(availability(m["name"], "cpu").split())
    return words


@pytest.mark.parametrize("blocked", [(), EXTRAS], ids=["rich", "plain"])
def test_info_fits_80_columns_without_splitting_words(blocked):
    done = cli(blocked, "info")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    flat = done.stdout.replace(",", ", ")
    assert not [w for w in _words_of_info() if w not in flat]
    assert ("+---" in done.stdout) == bool(blocked)  # plain text without rich, rich's boxes with it
    assert "Traceback" not in done.stderr


def test_info_and_check_work_in_plain_text():
    done = cli(EXTRAS, "info", columns=200)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("|")]
    rows = {r[0]: r for r in rows if r and r[0] in REGISTRY}
    assert rows["chunked"][-1] == "available here" and "[" not in done.stdout  # no rich markup left
    done = cli(EXTRAS, "check", "--quick", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\d+ passed, 0 failed, \d+ skipped$", done.stdout, re.M)


def test_bench_without_rich_says_which_extra_in_one_line():
    done = cli(EXTRAS, "bench", "--n", "16")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"leetdecoding bench: needs rich and matplotlib: pip install '{extras.DISTRIBUTION}[bench]'\n"
    )


def test_tune_works_in_plain_text(tmp_path):
    done = cli(EXTRAS, "tune", "--device", "cpu", "--quick", "--rounds", "1", "--heads", "1", "--dim", "16",
               "--dry-run")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "what auto will use" in done.stdout and "--dry-run: nothing written" in done.stdout


def test_the_integration_without_transformers_names_the_extra():
    code = (
        "try:\n    import leetdecoding.integrations.hf_minimax\n"
        "except ImportError as e:\n    print(type(e).__name__, e.name, e.__cause__, e.__suppress_context__)\n"
        "    print(e)\n"
    )
    done = run_blocked(("transformers",), code)
    assert done.returncode == 0, done.stderr
    first, message = done.stdout.splitlines()
    assert first == "ImportError transformers None True"  # one error, not transformers' chained traceback
    assert message.startswith("leetdecoding.integrations.hf_minimax needs transformers")
    assert message.endswith(f"pip install '{extras.DISTRIBUTION}[hf]'")


# ----- plain-text tables -----


def test_plain_wrap_never_splits_a_word():
    assert plain.wrap("needs a CUDA GPU (or TRITON_INTERPRET=1 set)", 10) == [
        "needs a", "CUDA GPU", "(or", "TRITON_INTERPRET=1", "set)",
    ]  # fmt: skip
    assert plain.strip_markup("[bold red]WRONG[/] [bench] [green]ok[/]") == "WRONG [bench] ok"


def test_plain_table_shrinks_the_widest_column_to_fit():
    t = plain.Table(title="t")
    t.add_column("a")
    t.add_column("b", justify="right")
    t.add_row("one two three four five six", "7")
    t.add_section()
    t.add_row("x", "[green]8[/]")
    lines = t.render(20).splitlines()
    assert max(map(len, lines)) <= 20
    assert lines[1:] == [
        "+--------------+---+",
        "| a            | b |",
        "+--------------+---+",
        "| one two      | 7 |",
        "| three four   |   |",
        "| five six     |   |",
        "+--------------+---+",
        "| x            | 8 |",
        "+--------------+---+",
    ]
