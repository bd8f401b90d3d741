"""Set-up and hygiene: one environment for run and test, a README whose links stay in the repository,
and a server log without third-party chatter at INFO."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_and_test_scripts_share_one_install(tmp_path):
    """run.sh and test.sh bootstrap the same environment: after one, the other does not reinstall. The
    venv's python is a recorder (no real install happens), so this runs offline in a second."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    for tool in ("python", "embedsvc"):
        fake = venv / "bin" / tool
        fake.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {log}\n")
        fake.chmod(0o755)
    # the scripts' defaults, whatever this run was started with (EMBEDSVC_SLOW=1 drops the marker)
    env = {**{k: v for k, v in os.environ.items() if k not in ("EMBEDSVC_TEST_WORKERS", "EMBEDSVC_SLOW")},
           "EMBEDSVC_VENV": str(venv)}
    subprocess.run([str(ROOT / "scripts" / "run.sh"), "--help"], env=env, check=True, timeout=60)
    stamp_after_run = (venv / ".embedsvc-installed").read_text()
    installs_after_run = log.read_text().count("pip install")
    subprocess.run([str(ROOT / "scripts" / "test.sh"), "-q"], env=env, check=True, timeout=60)
    assert "python -m pytest -n auto --dist loadfile -m not slow -q" in log.read_text()  # test.sh ran (the recorder) after bootstrap
    assert (venv / ".embedsvc-installed").read_text() == stamp_after_run
    assert log.read_text().count("pip install") == installs_after_run == 2  # torch, then embedsvc[dev]
    assert "[dev]" in log.read_text()


def test_readme_links_stay_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(r"`((?:\.\./|docs/)[^`\s]+\.md)`", readme)
    assert "docs/pooling.md" in targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        assert not target.startswith(".."), target
        assert (ROOT / target).is_file(), target


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
