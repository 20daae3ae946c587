"""The README's results table is the rendering of the committed run results, never typed by hand."""

from __future__ import annotations

import json

from experiments.readme_table import COLUMNS, RESULTS, ROOT, readme_block, render


def test_readme_table_equals_the_committed_results():
    results = json.loads(RESULTS.read_text())
    assert readme_block((ROOT / "README.md").read_text()) == render(results)


def test_render_shows_missing_values_and_the_command():
    results = {
        "commit": "0123456789abcdef",
        "train_command": "python train.py",
        "rows": [
            {
                "label": "A",
                "command": "python evaluate.py explainer=a",
                "samples": 10,
                "values": {COLUMNS[0][0]: 0.5, COLUMNS[1][0]: None},
            }
        ],  # fmt: skip
    }
    text = render(results)
    assert "| A | 0.500 | — |" in text and "`0123456789ab`" in text and "10 held-out" in text
    assert "`0123456789ab-dirty`" in render({**results, "commit": "0123456789abcdef-dirty"})
