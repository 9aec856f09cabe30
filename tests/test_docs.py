"""The documentation cannot rot: its commands parse, its code runs, its reference covers the public API.

Reads README.md and docs/**/*.md as text, with the ``--8<-- "path"`` includes expanded; nothing here
needs MkDocs (CI builds the site with ``mkdocs build --strict`` after installing the ``docs`` extra;
the slow tests at the end build it and draw the figures when it is installed).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

import lightning_mim.convert
import lightning_mim.data.prepare_cli
import lightning_mim.export
from lightning_mim.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
#: The modules of the API reference (the issue's list, plus the two the guides name) and their pages.
REFERENCE = {
    "lightning_mim": "index.md",
    "lightning_mim.callbacks": "callbacks.md",
    "lightning_mim.masking": "masking.md",
    "lightning_mim.losses": "losses.md",
    "lightning_mim.nn": "nn.md",
    "lightning_mim.nn.init": "nn.md",
    "lightning_mim.data": "data.md",
    "lightning_mim.optim": "optim.md",
    "lightning_mim.export": "export.md",
    "lightning_mim.patches": "patches.md",
}
#: The README's two commands (the quickstart; the install and tests, which .ci/run runs).
QUICKSTART = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && '
    "lightning-mim fit --config configs/quickstart/conmim.yaml"
)
TESTS = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python -m pytest'
LIGHTNING_CLI = {"fit", "validate", "test", "predict"}


def page_text(path: Path) -> str:
    """A page as MkDocs sees it: ``--8<-- "file"`` lines replaced by the file (pymdownx.snippets)."""
    text = path.read_text(encoding="utf-8")
    return re.sub(r'^--8<-- "([^"]+)"$', lambda m: (ROOT / m.group(1)).read_text(encoding="utf-8"), text, flags=re.M)


def fenced_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    for match in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        yield match.group(1), match.group(2)


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


#: A shell command of the docs: argv after ``lightning-mim``, and the file its output is redirected to.
Command = tuple[list[str], str | None]


def shell_commands(body: str) -> Iterator[Command]:
    """``lightning-mim ...`` command lines of a shell block, in order."""
    body = body.replace("\\\n", " ")
    for line in body.splitlines():
        if "lightning-mim" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True  # `# comment` is dropped; `&&`, `;`, `|`, `>` are tokens of their own
        tokens = list(lexer)
        command: list[str] = []
        for i, token in enumerate([*tokens, ";"]):
            if token not in ("&&", "||", ";", "|", ">"):
                command.append(token)
                continue
            if "lightning-mim" in command:
                redirect = tokens[i + 1] if token == ">" else None
                yield command[command.index("lightning-mim") + 1 :], redirect
            command = [] if token != ">" else ["(redirected)"]


#: Pages whose commands are checked: all but the changelog, a record of past versions.
COMMAND_PAGES = [page for page in PAGES if page.name != "changelog.md"]


def doc_commands() -> list[tuple[str, list[Command]]]:
    """The ``lightning-mim`` commands of the README and the pages, grouped as they run together.

    Each shell block (bash, sh, none) is one group, run in order in one folder (a command may write
    the file the next one reads: ``recipes show NAME > mine.yaml``). Inline code that starts with
    ``lightning-mim`` and has arguments is a group of its own, unless it is a synopsis (``[...]``
    options or ``...``); ``lightning-mim export`` alone names a command, it is not a command line.
    """
    found: list[tuple[str, list[Command]]] = []
    for page in COMMAND_PAGES:
        name = str(page.relative_to(ROOT))
        text = page_text(page)
        for index, (language, body) in enumerate(fenced_blocks(text)):
            commands = list(shell_commands(body)) if language in ("bash", "sh", "") else []
            if commands:
                found.append((f"{name}, block {index}", commands))
        for span in re.findall(r"`([^`]+)`", without_fences(text)):
            span = " ".join(span.split())
            if span.startswith("lightning-mim ") and len(span.split()) > 2 and "[" not in span and "..." not in span:
                found.append((f"{name}, `{span[:50]}`", list(shell_commands(span))))
    return found


COMMANDS = doc_commands()


class _Parsed(Exception):
    """Raised in place of the work a command would do, once its arguments are parsed."""


def _stop(*args: Any, **kwargs: Any) -> None:
    raise _Parsed(args, kwargs)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (config names resolve to the packaged recipes), examples importable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(ROOT / "examples"), *sys.path])  # restored after the test
    monkeypatch.setattr(sys, "argv", ["lightning-mim"])  # not pytest's arguments (LightningCLI reads them)
    return tmp_path


def test_the_docs_have_commands_of_every_kind() -> None:
    commands = [argv for _, group in COMMANDS for argv, _ in group]
    assert {argv[0] for argv in commands} == {"fit", "export", "convert", "recipes", "prepare-data"}
    assert len(commands) >= 45, len(commands)
    assert any(place.startswith("README.md") for place, _ in COMMANDS)


def run_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Parses one command without doing its work; returns what it printed."""
    out = io.StringIO()
    command = argv[0]
    if command in LIGHTNING_CLI:  # the whole config, resolved, instead of a run
        if "--print_config" not in argv:
            argv = [*argv, "--print_config"]
        with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code in (0, None)
        config = yaml.safe_load(out.getvalue())
        assert {"trainer", "model", "data"} <= set(config), sorted(config)
        if "--model.class_path" in argv:
            assert config["model"]["class_path"] == argv[argv.index("--model.class_path") + 1]
        return out.getvalue()
    if command == "recipes":  # lists or prints a packaged recipe: cheap, run it
        with redirect_stdout(out):
            main(argv)
        assert out.getvalue()
        return out.getvalue()
    assert command in ("export", "convert", "prepare-data"), f"unknown command {command!r}"
    monkeypatch.setattr(lightning_mim.export, "to_timm", _stop)
    monkeypatch.setattr(lightning_mim.convert, "convert", _stop)
    monkeypatch.setattr(lightning_mim.data.prepare_cli, "prepare_streaming_data", _stop)
    with pytest.raises(_Parsed):  # a bad command line exits with argparse's status 2 instead
        main(argv)
    return ""


@pytest.mark.parametrize(("place", "commands"), COMMANDS, ids=[place for place, _ in COMMANDS])
def test_every_command_in_the_docs_parses(
    place: str, commands: list[Command], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fit-like commands print their config (``--print_config``); the others parse and stop before working."""
    written = set()
    for argv, redirect in commands:
        printed = run_command(argv, monkeypatch)
        if redirect is not None:
            (isolated / redirect).write_text(printed)
            written.add(redirect)
    assert {p.name for p in isolated.iterdir()} == written, "a parse-only check wrote files"


def python_blocks() -> list[tuple[str, int, str]]:
    """Every Python block of the pages that is not an included example file (those have their own tests)."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for index, (language, body) in enumerate(fenced_blocks(text)):
            if language == "python" and not body.startswith("--8<--"):
                blocks.append((str(page.relative_to(ROOT)), index, body))
    return blocks


PYTHON_BLOCKS = python_blocks()


def test_the_included_examples_are_tested() -> None:
    included = set(re.findall(r'^--8<-- "(examples/[^"]+\.py)"$', "\n".join(p.read_text() for p in PAGES), re.M))
    assert included == {"examples/own_module_with_callbacks.py", "examples/change_one_part.py"}
    tests = (ROOT / "tests/test_examples.py").read_text() + (ROOT / "tests/test_extension.py").read_text()
    for path in included:
        assert Path(path).name in tests, f"{path} is shown in the docs but no test runs it"


def _export_for_the_timm_example(folder: Path) -> None:
    """A small ConMIM encoder exported where the evaluate-and-export page loads one."""
    from lightning_mim import ConMIMModule

    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3}
    module = ConMIMModule(backbone_kwargs=tiny, proj_hidden_dim=32, proj_dim=16)
    lightning_mim.export.to_timm(module, folder / "exported" / "conmim")


@pytest.mark.parametrize(("page", "index", "code"), PYTHON_BLOCKS, ids=[f"{p}:{i}" for p, i, _ in PYTHON_BLOCKS])
def test_every_python_block_in_the_docs_runs(page: str, index: int, code: str, isolated: Path) -> None:
    if "exported/conmim" in code:
        _export_for_the_timm_example(isolated)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code, f"{page} (block {index})", "exec"), namespace)
    if "exported/conmim" in code:  # the timm model takes the exported weights
        model = namespace["model"]
        features = model(torch.rand(2, 3, 32, 32))
        assert features.shape == (2, 48)


def test_there_are_python_blocks_on_every_method_page() -> None:
    pages = {page for page, _, _ in PYTHON_BLOCKS}
    assert {f"docs/methods/{m}.md" for m in ("conmim", "cmae", "mimco", "cim")} <= pages
    assert {"docs/guides/own-trainer.md", "docs/guides/evaluate-export.md"} <= pages


def _resolve(target: str) -> Any:
    """The object a ``:::`` line names: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(target)


def directives(page: str) -> list[str]:
    return re.findall(r"^::: (\S+)$", (DOCS / "reference" / page).read_text(), flags=re.M)


def public_paths(module: ModuleType, name: str) -> set[str]:
    """The ``:::`` targets that document ``module.name``: its public path or where it is defined."""
    obj = getattr(module, name)
    paths = {f"{module.__name__}.{name}"}
    if isinstance(getattr(obj, "__qualname__", None), str) and isinstance(getattr(obj, "__module__", None), str):
        paths.add(f"{obj.__module__}.{obj.__qualname__}")
    return paths


def test_the_api_reference_documents_every_public_name() -> None:
    assert {
        "lightning_mim",
        "lightning_mim.callbacks",
        "lightning_mim.masking",
        "lightning_mim.losses",
        "lightning_mim.nn",
        "lightning_mim.data",
        "lightning_mim.optim",
        "lightning_mim.export",
    } <= set(REFERENCE)
    missing = []
    for module_name, page in REFERENCE.items():
        module = importlib.import_module(module_name)
        documented = set(directives(page))
        for name in module.__all__:
            if not public_paths(module, name) & documented:
                missing.append(f"{module_name}.{name} (add `::: {module_name}.{name}` to docs/reference/{page})")
    assert not missing, "public names missing from the API reference:\n" + "\n".join(missing)


def test_the_api_reference_documents_only_public_names_that_import() -> None:
    public: set[str] = set()
    for module_name in REFERENCE:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            public |= public_paths(module, name)
    pages = sorted(p.name for p in (DOCS / "reference").glob("*.md"))
    assert set(REFERENCE.values()) == set(pages), pages
    for page in pages:
        for target in directives(page):
            assert _resolve(target) is not None
            assert target in public, f"docs/reference/{page}: {target} is not a public name of {sorted(REFERENCE)}"


def test_yaml_blocks_parse_and_name_classes_that_exist() -> None:
    blocks = [(p, body) for p in PAGES for language, body in fenced_blocks(page_text(p)) if language == "yaml"]
    assert blocks
    for page, body in blocks:
        config = yaml.safe_load(body)
        paths = re.findall(r"class_path: (\S+)", body)
        assert config and paths, f"{page}: {body[:80]}"
        for path in paths:
            assert isinstance(_resolve(path), type), f"{page}: {path}"


def test_the_readme_is_short_and_keeps_its_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    words = len(text.split())
    assert words < 1200, f"README.md has {words} words"
    commands = [body.strip() for language, body in fenced_blocks(text) if language == "bash"]
    assert QUICKSTART in commands and TESTS in commands
    assert TESTS in (ROOT / ".ci/run").read_text(), ".ci/run must run the README's test command"
    for method in ("conmim", "cmae", "mimco", "cim"):  # the method table links each method's page
        assert f"(docs/methods/{method}.md)" in text


def nav_pages(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from nav_pages(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from nav_pages(value)


def test_the_site_lists_every_page_and_every_page_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = list(nav_pages(config["nav"]))
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == on_disk
    guides = {
        "getting-started",
        "recipes",
        "own-trainer",
        "change-one-part",
        "evaluate-export",
        "official-checkpoints",
        "scale-out",
        "reliability",
        "performance",
    }
    assert {f"guides/{g}.md" for g in guides} <= set(listed)
    assert {f"methods/{m}.md" for m in ("conmim", "cmae", "mimco", "cim")} <= set(listed)
    assert "site/" in (ROOT / ".gitignore").read_text().split()
    assert "mkdocs build --strict" in (ROOT / ".ci/run").read_text()


def links(page: Path) -> Iterator[str]:
    for target in re.findall(r"\]\(([^)\s]+)\)", without_fences(page.read_text(encoding="utf-8"))):
        if not re.match(r"[a-z]+://", target) and not target.startswith("#"):
            yield target


def test_relative_links_and_pictures_exist() -> None:
    for page in PAGES:
        # the README is the landing page: its links are relative to the checkout, docs/... on the site
        for target in links(page):
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if page == README:
                assert path.is_relative_to(DOCS), f"README.md links to {target}: only docs/ pages reach the site"
    pictures = [(p, t) for p in PAGES for t in links(p) if t.endswith(".png")]
    assert len(pictures) >= 10
    for page, target in pictures:
        picture = (page.parent / target).resolve()
        assert picture.stat().st_size < 200_000, f"{target} is {picture.stat().st_size} bytes"
        name = picture.stem.rsplit("_", 1)[0]  # conmim_curves -> conmim
        assert f"python docs/make_figures.py --run-dir runs/quickstart/{name}" in page.read_text(), (
            f"{page.relative_to(ROOT)} shows {target} without the command that drew it"
        )


def test_the_landing_page_hook_rewrites_readme_links() -> None:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert hooks.readme_for_site("[a](docs/guides/recipes.md) [b](https://x.org/docs/y)") == (
        "[a](guides/recipes.md) [b](https://x.org/docs/y)"
    )
    site_links = re.findall(r"\]\(([^)\s]+)\)", hooks.readme_for_site(README.read_text()))
    for target in site_links:
        if not re.match(r"[a-z]+://", target):
            assert (DOCS / target.split("#")[0]).exists(), target


@pytest.mark.slow
def test_the_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``, as CI runs it (needs the ``docs`` extra)."""
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).exists():
        pytest.fail('mkdocs is not installed: pip install -e ".[docs]"')
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site/reference/callbacks/index.html").exists()


@pytest.mark.slow
def test_make_figures_draws_a_run(tmp_path: Path) -> None:
    """``docs/make_figures.py`` on a small fake ConMIM run (needs matplotlib, the ``docs`` extra)."""
    if importlib.util.find_spec("matplotlib") is None:
        pytest.fail('matplotlib is not installed: pip install -e ".[docs]"')
    from torchvision.utils import make_grid, save_image

    log = tmp_path / "conmim/csv/version_0"
    (log / "diagnostics").mkdir(parents=True)
    with (log / "metrics.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "step", "train/loss", "val/knn_top1"])
        writer.writerow(["", 0, "", 26.4])
        for step in range(9, 100, 10):
            writer.writerow([0, step, 2.8 - step / 100, ""])
        writer.writerow([0, 99, "", 28.0])
    for step in (0, 100):
        tiles = torch.rand(4 * 3, 3, 32, 32)  # 4 images x (input, mask, similarity)
        save_image(make_grid(tiles, nrow=3, padding=1, pad_value=1.0), log / f"diagnostics/step_{step:07d}.png")
    out = tmp_path / "img"
    result = subprocess.run(
        [sys.executable, str(DOCS / "make_figures.py"), "--run-dir", str(tmp_path / "conmim"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["conmim_curves.png", "conmim_panels.png"]
    assert "val/knn_top1: 26.4, 28.0 at steps [0, 99]" in result.stdout
