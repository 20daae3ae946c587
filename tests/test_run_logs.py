"""What a run says and records about itself: the filtered third-party noise (and verbose), the header naming what
runs where, the machine entry of metrics.json / run.json, early errors for bad numbers, truncated prompts."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from mmel.utils import logs
from mmel.utils.machine import KEY_FIELDS, machine, machine_fingerprint, machine_key, same_machine_kind
from tests.test_programs import WORLD, cfg_for

pytestmark = pytest.mark.program  # runs whole programs: `pytest -m "not program"` skips it

# longer than the micro CLIP's 16-token context: every prompt of the run is cut
LONG_TEMPLATE = "a photo of a {} lying on a wooden table in a sunny room next to an open window at noon."


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from mmel.data.shapes import generate

    return generate(tmp_path_factory.mktemp("world"), seed=3, **WORLD)


class _Collect(logging.Handler):
    """Every record reaching the loggers it is attached to (Lightning's logger does not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


def _evaluate(cfg) -> tuple[dict, _Collect, list[str]]:
    """Run evaluate in-process; returns (results, the log records, the warning messages)."""
    from mmel.evaluate import run

    handler = _Collect()
    targets = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric", "mmel")]
    levels = [lg.level for lg in targets]
    for lg in targets:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every warning reaches the record, unless a program filter drops it
            results, _ = run(cfg)
    finally:
        for lg, level in zip(targets, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    return results, handler, [str(w.message) for w in caught]


def test_default_run_is_quiet_starts_with_its_header_and_records_truncated_prompts(world, tmp_path, monkeypatch):
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")  # recorded, so restored after
    monkeypatch.setattr("mmel.backbone._TOLD_TRUNCATED", set())  # truncations are logged once per process
    out = tmp_path / "quiet"
    over = ["limit=3", "figure_samples=0", "data.batch_size=2", f"data.prompt_template='{LONG_TEMPLATE}'"]
    results, records, warned = _evaluate(cfg_for("evaluate", world, out, over))

    assert "litlogger" not in records.text() and "Tip:" not in records.text()
    assert not [w for w in warned if "LeafSpec" in w]
    # the first lines say what runs where, before Lightning's seed line or anything else
    first = [r.getMessage() for r in records.records[:6]]
    assert first[0].startswith("evaluate: model mmel-micro, weights none (random init)"), first
    assert any(m.startswith("evaluate: data ") and f"root {world}" in m and "split test" in m for m in first)
    assert any(m.startswith("evaluate: explainer grad_eclip") for m in first)
    assert any(m.startswith("evaluate: device cpu (") and "torch threads" in m for m in first)
    assert any(m == f"evaluate: output {out}" for m in first)
    assert "evaluate: " in records.text() and "items in split test (limit=3: the first 3)" in records.text()

    # a prompt longer than the context: logged (kept of total), and recorded per item and in metrics.json
    cut = [r.getMessage() for r in records.records if "truncated to the text tower's context" in r.getMessage()]
    assert cut and all("16 of its" in m for m in cut)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert items and all(r["prompt_tokens"]["kept"] == 16 and r["prompt_tokens"]["total"] > 16 for r in items)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(on_disk["truncated_prompts"]) == {r["prompt"] for r in items}

    # the machine that decides the last bits, in metrics.json and run.json
    m = on_disk["run"]["machine"]
    assert m["device"] == "cpu" and m["threads"] >= 1 and m["key"] == machine_key(m)
    assert json.loads((out / "run.json").read_text())["machine"]["key"] == m["key"]


def test_verbose_keeps_the_filtered_lines(world, tmp_path, monkeypatch):
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")  # "0": not verbose; restored (to unset) after the test, which sets it
    cfg = cfg_for("evaluate", world, tmp_path / "loud", ["limit=1", "figure_samples=0", "verbose=true"])
    _, records, warned = _evaluate(cfg)
    assert "litlogger" in records.text()
    assert [w for w in warned if "LeafSpec" in w]
    logs.quiet_third_party(False)  # back to the default for the tests that follow


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", r"data.batch_size=0: expected an integer >= 1"),
        ("data.batch_size=-3", r"data.batch_size=-3: expected an integer >= 1"),
        ("data.num_workers=-1", r"data.num_workers=-1: expected an integer >= 0"),
        ("limit=-1", r"limit=-1: expected an integer >= 1 .*null = all of them"),
        ("limit=0", r"limit=0: expected an integer >= 1"),
        ("limit=all", r"limit='all': expected an integer >= 1"),
    ],
)
def test_bad_numbers_are_named_before_anything_runs(world, tmp_path, override, message):
    from mmel.evaluate import run

    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=message):
        run(cfg_for("evaluate", world, out, [override]))
    assert not (out / "run.json").exists()  # refused before anything was written


def test_train_refuses_a_zero_batch_size(world, tmp_path):
    from mmel.train import run

    with pytest.raises(ValueError, match=r"data.batch_size=0: expected an integer >= 1 \(samples per batch\)"):
        run(cfg_for("train", world, tmp_path / "t", ["data.batch_size=0"]))


def test_machine_entry_from_cpuinfo_and_its_key(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_tile\n"
    )
    m = machine("cpu", cpuinfo=info)
    assert m["cpu_model"] == "Test CPU 9000"
    assert m["cpu_flags"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "amx_tile"]  # fpu: no kernel choice
    assert m["device"] == "cpu" and m["gpu"] is None and m["threads"] >= 1
    key = machine_key(m)
    assert len(key) == 12 and key == machine_key(dict(m))  # stable
    assert machine_key({**m, "cuda": "12.4"}) == key  # not a kernel-deciding field
    for field, other in (("cpu_flags", ["avx", "avx2"]), ("threads", m["threads"] + 1), ("gpu", "NVIDIA H200")):
        assert field in KEY_FIELDS and machine_key({**m, field: other}) != key, field
    assert same_machine_kind(m, dict(m)) is True
    assert same_machine_kind(m, {**m, "cpu_capability": "AVX2"}) is False
    assert same_machine_kind(m, None) is None  # a run recorded before machines were
    missing = machine("cpu", cpuinfo=tmp_path / "absent")  # not Linux: platform fallback, no flags
    assert missing["cpu_flags"] is None
    facts, k = machine_fingerprint("cpu")
    assert k == machine_key(facts)


def _usage_commands() -> list[str]:
    """The command lines of the README's Usage block (comments cut)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("python ")]


def test_readme_quoting_of_unusual_prompts_parses_as_documented():
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    explain = [c for c in _usage_commands() if c.startswith("python explain.py") and "🐱" in c]
    assert explain, "the README's Usage shows how to quote a prompt with an emoji"
    overrides = shlex.split(explain[0])[2:]  # what the shell hands to Hydra
    prompts = next(o for o in parser.parse_overrides(overrides) if o.key_or_group == "prompts").value()
    assert prompts == ["a 🐱 on a sofa", "a cat, asleep"]
    with pytest.raises(Exception, match="token recognition error"):  # unquoted, Hydra's grammar refuses the emoji
        parser.parse_override("prompts=[a 🐱 on a sofa]")


def test_readme_says_how_to_continue_a_killed_training_run():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    line = next(c for c in _usage_commands() if c.startswith("python train.py ckpt_path="))
    assert "ckpt_path" in OmegaConf.load(conf / "train.yaml")  # the key the README names exists
    last = OmegaConf.load(conf / "callbacks" / "default.yaml").last_checkpoint
    assert line.endswith(f"checkpoints/{last.filename}.ckpt") and last.every_n_epochs == 1  # what a kill leaves


def test_pretrainer_builds_its_clip_without_the_initialized_randomly_warning(caplog, monkeypatch):
    from mmel.pretrain.module import TinyClipPretrainer

    monkeypatch.setenv(logs.VERBOSE_ENV, "0")  # recorded, so restored after
    with caplog.at_level(logging.INFO):
        TinyClipPretrainer(arch="mmel-micro")  # trained from scratch: "initialized randomly" is no news
    assert "initialized randomly" not in caplog.text
    caplog.clear()
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    with caplog.at_level(logging.INFO):
        TinyClipPretrainer(arch="mmel-micro")
    assert "No pretrained weights loaded for model 'mmel-micro'" in caplog.text  # verbose: open_clip says it


def test_the_tip_filter_drops_only_lightnings_advertisements(monkeypatch, caplog):
    from mmel.backbone import load_clip

    logger = logging.getLogger(logs.LIGHTNING_RANK_ZERO)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        logs.quiet_third_party(False)
        logger.warning("💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/...)")
        logger.warning("💡 Tip: For seamless cloud uploads ... try installing [litmodels](https://pypi.org/...)")
        logger.warning("GPU available: False, used: False")
        logger.warning("a line that mentions litlogger but is no tip")
        assert handler.text().splitlines() == [
            "GPU available: False, used: False",
            "a line that mentions litlogger but is no tip",
        ]
        logs.quiet_third_party(True)
        logger.warning("💡 Tip: ... [litmodels] ...")
        assert handler.text().splitlines()[-1] == "💡 Tip: ... [litmodels] ..."
    finally:
        logs.quiet_third_party(False)
        logger.removeHandler(handler)
    # open_clip's "initialized randomly" doubles mmel's own line for a random CLIP: only verbose shows it
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")  # recorded, so restored after
    with caplog.at_level(logging.INFO):
        load_clip("mmel-micro")
    assert "No pretrained weights loaded" not in caplog.text and "random weights" in caplog.text
    caplog.clear()
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    with caplog.at_level(logging.INFO):
        load_clip("mmel-micro")
    assert "No pretrained weights loaded for model 'mmel-micro'" in caplog.text


def test_a_split_without_samples_is_an_error_not_a_metrics_file_of_nulls(world, tmp_path, monkeypatch):
    from mmel.data import ShapesDataModule
    from mmel.evaluate import run

    class Empty(list):
        skipped: dict = {}
        records: list = []

    monkeypatch.setattr(ShapesDataModule, "dataset", lambda self, split: Empty())
    out = tmp_path / "empty"
    with pytest.raises(ValueError, match=r"split 'test' of data.root=.* has no samples to score"):
        run(cfg_for("evaluate", world, out, []))
    assert not (out / "metrics.json").exists()


def test_resume_on_another_machine_kind_is_logged_not_refused(tmp_path, caplog):
    from mmel.evaluation.records import check_fingerprint, write_fingerprint

    here = machine("cpu")
    fp = {"task": "evaluate", "seed": 1}
    write_fingerprint(tmp_path, fp, here)
    with caplog.at_level(logging.WARNING, logger="mmel.evaluation.records"):
        check_fingerprint(tmp_path, fp, dict(here))
        assert not caplog.records
        check_fingerprint(tmp_path, fp, {**here, "cpu_capability": "OTHER"})
    assert "started on another kind of machine" in caplog.text and "OTHER" in caplog.text
