"""The house rules of the package: registry names, lazy registration, one HSRM conversion, hsrm.pt that knows its
CLIP, honest load logs, sparse progress bars off a terminal, and a sweep key that must exist."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys

import pytest
import torch

from mmel.backbone import load_clip, weights_fingerprint
from mmel.explainers import available, build_explainer, explainer_class
from mmel.hsrm import HSRM, HSRMInputs, hsrm_config, load_hsrm, read_hsrm, save_hsrm
from mmel.utils.progress import SparseProgressBar
from mmel.utils.runs import optimized_value


def test_the_registry_names_every_class_and_imports_mmel_lazily():
    for name in available():
        assert explainer_class(name).name == name
    code = "import sys, mmel.explainers; print('mmel.hsrm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # the explainers never import the HSRM (a layer above them)


def test_mmel_is_an_explainer_like_the_others(micro_clip):
    from mmel.explainers.base import Explainer

    e = build_explainer("mmel", micro_clip, layers=2)
    assert isinstance(e, Explainer) and e.name == "mmel"
    with pytest.raises(ValueError, match="prompts: the list is empty"):
        e(torch.randn(1, 3, 32, 32), [])
    with pytest.raises(ValueError, match="multiple of the patch"):
        e(torch.randn(1, 3, 30, 32), ["a"])


def test_hsrm_inputs_from_evidence_shared_and_paired(micro_clip):
    ge = build_explainer("grad_eclip", micro_clip)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shared = HSRMInputs.from_evidence(ge.layer_evidence(images, ["a", "b", "c"], layers=[-2, -1]))
    assert shared.evidence.shape[:2] == (6, 2) and shared.keys.shape[0] == 2 and shared.text.shape[0] == 6
    torch.testing.assert_close(shared.text[0], shared.text[3])  # prompt 0 for image 0 and image 1
    paired = HSRMInputs.from_evidence(ge.layer_evidence(images, ["a", "c"], layers=[-2, -1], paired=True))
    assert paired.evidence.shape[:2] == (2, 2) and paired.text.shape[0] == 2
    torch.testing.assert_close(paired.evidence[1], shared.evidence[5])  # image 1 with "c" either way
    back = HSRMInputs.stack(paired.rows())
    for f in HSRMInputs.fields():
        assert torch.equal(getattr(back, f), getattr(paired, f)), f
    with pytest.raises(ValueError, match="one pair per image"):
        shared.rows()


def test_hsrm_checkpoint_records_its_clip_and_warns_on_other_weights(micro_clip, tmp_path):
    hsrm = HSRM.for_clip(micro_clip.model, num_layers=2)
    with torch.no_grad():
        hsrm.d_alpha.add_(0.3)
    path = save_hsrm(tmp_path / "hsrm.pt", hsrm, hsrm_config(micro_clip, [0, 1], [1, 2, 4], 0.1))
    state, cfg = read_hsrm(path)
    assert cfg["backbone"] == "mmel-micro" and cfg["fingerprint"] == weights_fingerprint(micro_clip.model)
    assert set(torch.load(path, weights_only=True)) == {"hsrm", "config"}
    loaded, _ = load_hsrm(path, micro_clip)  # same weights: no warning
    assert torch.equal(loaded.d_alpha, hsrm.d_alpha)
    torch.manual_seed(123)
    other_weights = load_clip("mmel-micro")  # same architecture, other (random) weights
    assert other_weights.fingerprint != micro_clip.fingerprint
    with pytest.warns(UserWarning, match="fingerprint"):
        build_explainer("mmel", other_weights, checkpoint=str(path))
    with pytest.raises(ValueError, match="trained for backbone 'mmel-micro'"):
        build_explainer("mmel", load_clip("mmel-micro-quickgelu"), checkpoint=str(path))


def test_loading_weights_logs_what_was_loaded_and_not_initialized_randomly(tmp_path, caplog):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    clip = load_clip("mmel-micro")
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(f))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = load_clip("mmel-micro", pretrained=str(f))
    assert "initialized randomly" not in caplog.text
    assert "Parsing model identifier" not in caplog.text  # open_clip's INFO chatter stays out of run logs
    sha = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    assert f"loaded weights from file {f} (sha256 {sha}, fingerprint {again.fingerprint})" in caplog.text
    assert again.fingerprint == clip.fingerprint
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_clip("mmel-micro")  # truly random: that is said
    assert "random weights" in caplog.text and "initialized randomly" in caplog.text


def test_progress_bar_is_sparse_off_a_terminal(monkeypatch):
    bar = SparseProgressBar(interval=30.0)
    monkeypatch.setattr(SparseProgressBar, "is_enabled", property(lambda self: True))
    clock = iter([0.0, 1.0, 2.0, 31.0, 32.0, 33.0])
    monkeypatch.setattr("mmel.utils.progress.time.monotonic", lambda: next(clock))
    monkeypatch.setattr(SparseProgressBar, "on_terminal", staticmethod(lambda: False))
    drawn = [bar._should_update(n, 100) for n in (1, 2, 3, 4, 5)] + [bar._should_update(100, 100)]
    assert drawn == [True, False, False, True, False, True]  # first, after 30 s, and the end
    monkeypatch.setattr(SparseProgressBar, "on_terminal", staticmethod(lambda: True))
    assert all(bar._should_update(n, 100) for n in range(1, 10))  # a terminal: every batch, as Lightning does


def test_an_unknown_optimized_metric_is_an_error():
    metrics = {"val/pointing_game": torch.tensor(0.5), "test/energy": 0.25}
    assert optimized_value(metrics, "val/pointing_game") == 0.5
    assert optimized_value(metrics, None) is None
    with pytest.raises(KeyError, match="val/pointing_gmae"):
        optimized_value(metrics, "val/pointing_gmae")
    with pytest.raises(KeyError, match="vall/pointing_game"):
        optimized_value(metrics, "vall/pointing_game")
    assert optimized_value({"test/energy": 0.25}, "val/pointing_game") is None  # train=false: no val stage ran


def test_hsrm_checkpoint_keeps_the_ablation_switches(micro_clip, tmp_path):
    hsrm = HSRM.for_clip(micro_clip.model, num_layers=2, scales=(2,), layer_weights="uniform", gate=False)
    cfg = hsrm_config(micro_clip, [0, 1], [2], 0.1, layer_weights="uniform", gate=False)
    loaded, _ = load_hsrm(save_hsrm(tmp_path / "a.pt", hsrm, cfg), micro_clip)
    assert loaded.layer_weights == "uniform" and not loaded.use_gate and loaded.scales == [2]
    assert loaded.conditioning == "prompt"  # not recorded: read from the weights (they hold the matrix)


def test_a_file_from_before_prompt_conditioning_loads_unconditioned(micro_clip, tmp_path):
    old = HSRM.for_clip(micro_clip.model, num_layers=2, scales=(2,), conditioning="none")
    path = save_hsrm(tmp_path / "old.pt", old, hsrm_config(micro_clip, [0, 1], [2], 0.1))  # no "conditioning"
    loaded, _ = load_hsrm(path, micro_clip)
    assert loaded.conditioning == "none" and not hasattr(loaded, "cond")
    new = HSRM.for_clip(micro_clip.model, num_layers=2, scales=(2,))
    cfg = hsrm_config(micro_clip, [0, 1], [2], 0.1, conditioning="prompt")
    assert load_hsrm(save_hsrm(tmp_path / "new.pt", new, cfg), micro_clip)[0].conditioning == "prompt"


def test_the_tiny_clip_loads_with_one_honest_log_line(caplog):
    with caplog.at_level(logging.INFO):
        clip = load_clip("mmel-tiny", "shapes")
    assert "initialized randomly" not in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and lines[0].startswith("CLIP mmel-tiny: loaded weights from file ")
    assert lines[0].endswith(f"fingerprint {clip.fingerprint})") and "mmel-tiny-shapes.safetensors (sha256 " in lines[0]
