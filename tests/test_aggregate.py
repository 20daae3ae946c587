"""experiments/aggregate.py turns run dirs into a table without inventing numbers."""

from __future__ import annotations

import json

import yaml

from experiments.aggregate import build_table, find_runs, main, to_markdown


def fake_run(root, name, explainer, metrics):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"task_name": "evaluate", "model": {"name": "mmel-tiny"}, "explainer": {"name": explainer}})
    )
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_table_from_runs(tmp_path):
    fake_run(tmp_path, "a", "grad_eclip", {"test": {"pointing_game": 0.5, "iou": 0.25}})
    fake_run(tmp_path, "b", "rollout", {"test": {"pointing_game": 0.125}})
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "metrics.json").write_text("{}")  # no .hydra: not a run
    runs = find_runs([tmp_path])
    assert [r.name for r in runs] == ["a", "b"]
    header, body = build_table(runs, ["explainer.name"])
    assert header == ["explainer.name", "test/iou", "test/pointing_game", "run"]
    assert body[0] == ["grad_eclip", "0.2500", "0.5000", "a"]
    assert body[1] == ["rollout", "—", "0.1250", "b"]  # missing metric stays missing
    assert to_markdown(header, body).count("\n") == 4


def test_cli_writes_csv(tmp_path, capsys):
    fake_run(tmp_path, "a", "grad_eclip", {"pg": 1.0})
    out = tmp_path / "t.csv"
    assert main([str(tmp_path), "--rows", "explainer.name", "--out", str(out)]) == 0
    assert out.read_text().splitlines() == ["explainer.name,pg,run", "grad_eclip,1.0000,a"]
    assert main([str(tmp_path / "none")]) == 1


def test_lookup_resolves_project_interpolations_and_keeps_runtime_ones():
    from experiments.aggregate import lookup

    cfg = {"hsrm": {"scales": "${hsrm_default:scales}"}, "paths": {"out": "${hydra:runtime.output_dir}"}}
    assert lookup(cfg, "hsrm.scales") == [1, 2, 4]
    assert lookup(cfg, "paths.out") == "${hydra:runtime.output_dir}"
    assert lookup(cfg, "hsrm.missing") is None
