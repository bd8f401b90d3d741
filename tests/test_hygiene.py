"""Set-up and hygiene: one environment for run and test, the README's set-up commands, a README and docs pages whose
links resolve, and a server log without third-party chatter at INFO."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_and_test_scripts_share_one_install(tmp_path):
    """run.sh and test.sh bootstrap the same environment: after one, the other does not reinstall. The
    venv's python is a recorder (no real install happens), so this runs offline in a second."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    for tool in ("python", "embedsvc"):
        fake = venv / "bin" / tool
        fake.write_text(f'#!/bin/sh\necho {tool} "$@" >> {log}\n')
        fake.chmod(0o755)
    # the scripts' defaults, whatever this run was started with (EMBEDSVC_SLOW=1 drops the marker)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("EMBEDSVC_TEST_WORKERS", "EMBEDSVC_SLOW")},
        "EMBEDSVC_VENV": str(venv),
    }
    subprocess.run([str(ROOT / "scripts" / "run.sh"), "--help"], env=env, check=True, timeout=60)
    stamp_after_run = (venv / ".embedsvc-installed").read_text()
    installs_after_run = log.read_text().count("pip install")
    subprocess.run([str(ROOT / "scripts" / "test.sh"), "-q"], env=env, check=True, timeout=60)
    assert (
        "python -m pytest -n auto --dist loadfile -m not slow -q" in log.read_text()
    )  # test.sh ran (the recorder) after bootstrap
    assert (venv / ".embedsvc-installed").read_text() == stamp_after_run
    assert log.read_text().count("pip install") == installs_after_run == 2  # torch, then embedsvc[dev]
    assert "[dev]" in log.read_text()


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path in backticks that names a file of this repository (`embedsvc/service/calls.py`, `bench/scale.py`).
REPO_PATH = re.compile(r"`((?:embedsvc|tests|bench|scripts|deploy|protos|docs|\.ci)/[^`\s<>*{}]*)`")


def prose(page: Path) -> str:
    """The page without its fenced code blocks, whose text is code, not links."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)


def anchors(page: Path) -> set[str]:
    """The anchors a heading gets both on GitHub (each space a hyphen) and from mkdocs (runs of them one): only
    these work wherever the page is read."""
    github, mkdocs = set(), set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), flags=re.MULTILINE):
        words = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        github.add(words.replace(" ", "-"))
        mkdocs.add(re.sub(r"[-\s]+", "-", words).strip("-"))
    return github & mkdocs


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_and_named_files_exist(page):
    """Every relative link of the README and the docs pages points at a file of the repository (a docs page's
    at a file under docs/, the site's root), and at a heading of it when it names one; every repository path
    named in backticks exists."""
    home = page.parent
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (home / path).resolve() if path else page
        assert file.is_relative_to(home), f"{target}: outside {home.relative_to(ROOT) or '.'}"
        assert file.is_file(), f"{target}: no such file"
        if anchor:
            assert file.suffix == ".md" and anchor in anchors(file), f"{target}: no such heading"
    for named in REPO_PATH.findall(page.read_text()):
        assert (ROOT / named).exists(), f"{page.name} names {named}, which does not exist"


def test_readme_links_to_every_docs_page_and_the_site_lists_them():
    targets = re.findall(r"\]\((docs/[^)\s]+)\)", prose(ROOT / "README.md"))
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in targets}
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOC_PAGES[1:]:
        if page.name != "index.md":
            assert page.resolve() in linked, f"the README does not link {page.relative_to(ROOT)}"
        assert f": {page.name}\n" in nav, f"mkdocs.yml's nav lacks {page.name}"


def test_readme_setup_commands_are_the_scripts_ci_runs():
    """The README's two set-up commands exist and are the ones CI uses: run.sh serves, test.sh is what .ci/run
    runs after scripts/check."""
    setup = ROOT.joinpath("README.md").read_text().split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)\n```", setup, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["scripts/run.sh", "scripts/test.sh"], commands
    for command in commands:
        assert os.access(ROOT / command, os.X_OK), command
    assert 'exec "$venv/bin/embedsvc" serve' in (ROOT / "scripts" / "run.sh").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("bash scripts/check") < ci.index("bash scripts/test.sh")


def test_third_party_info_and_deprecations_stay_below_info(tiny_spec, capsys):
    from embedsvc.models import load_model
    from embedsvc.service.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        load_model(tiny_spec)  # open_clip logs "Loaded ... model config" style INFO lines on the root logger
        logging.info("a library's note on the root logger")  # noqa: LOG015 - the case under test
        warnings.warn("old_api is deprecated; use new_api", DeprecationWarning)  # noqa: B028 - as libraries do
        logging.getLogger("ray.data").warning("DeprecationWarning: `ray.data.foo` is deprecated")
        logging.getLogger("embedsvc.test").info("ours")
        logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")  # what `serve` printed
        logging.getLogger("uvicorn.error").info("Started server process [1]")
        logging.getLogger("other.lib").warning("a real warning")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    loggers = [e["logger"] for e in lines]
    assert not {"root", "py.warnings", "ray.data", "faiss.loader", "uvicorn.error"} & set(loggers), lines
    assert ("embedsvc.test", "ours") in [(e["logger"], e["msg"]) for e in lines]
    assert ("other.lib", "a real warning") in [(e["logger"], e["msg"]) for e in lines]  # real warnings stay


def test_the_long_files_handed_out_first_exist():
    """conftest.LONG_FILES names test files (xdist hands them out first): a renamed or removed one would quietly stop
    being scheduled early, and the suite's time would grow back with nothing to say why."""
    from conftest import LONG_FILES

    assert len(set(LONG_FILES)) == len(LONG_FILES)
    assert [name for name in LONG_FILES if not (ROOT / "tests" / name).is_file()] == []
