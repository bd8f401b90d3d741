"""The digits flow of bench/digits.py from the CLI alone, shortened: manifest from scikit-learn's digits,
`embedsvc train`, `embedsvc compare --checkpoint` on the held-out rows, next to the bundled model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains a model and runs two comparisons (minutes on 2 cores)
def test_digits_flow_from_the_cli(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "digits.py"), "--out", str(out), "--steps", "40", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| chance (random ranking) | - | 0.100 |" in proc.stdout  # 10 captions, one class each
    for folder in ("compare-trained", "compare-bundled"):
        result = json.loads((out / folder / "results.json").read_text())
        assert result["size"] == 360 and result["relevance"]["classes"] == 10
        assert result["relevance"]["distinct_captions"] == 10
        cls = result["poolings"][0]["metrics"]
        assert cls["text_to_image"]["queries"] == 10 and cls["image_to_text"]["candidates"] == 10
        assert cls["image_to_text"]["chance_recall_at_1"] == pytest.approx(0.1)
    card = json.loads((out / "model" / "model_card.json").read_text())
    assert card["held_out"]["image_to_text"]["queries"] == 360
