"""Every baseline equals its authors' computation: each explainer against an independent reference (tests/_parity.py;
LeGrad against the authors' package legrad-torch), on the committed tiny CLIP (fast, default run) and on a
random-weight ViT-B/16 at 224 px (``slow``).

Criterion, for every (image, prompt) map: Pearson >= 0.999 and the same peak patch. The reference and the
explainer run the same float32 arithmetic in a different order (batched prompts, a cut graph, one VJP instead of K
backward passes), so maps agree to ~1e-6 relative, far above 0.999; 0.999 leaves room for other CPUs' kernels,
M2IB's 10 Adam steps (which rescale rounding-level gradient differences) and RISE's sums over masks.

docs/parity.md's table is written by these tests: each test checks its own cell (the measured numbers, at 3
decimals) and the descriptive cells; ``MMEL_WRITE_PARITY=1 pytest tests/test_parity.py -m "slow or not slow"``
rewrites them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from mmel.explainers import build_explainer
from tests import _parity as P

DOC = Path(__file__).resolve().parents[1] / "docs" / "parity.md"
BEGIN, END = "<!-- parity:begin -->", "<!-- parity:end -->"
MODELS = {
    "tiny": "mmel-tiny (shapes), 64 px: Pearson mean / min · same peak",
    "vitb16": "ViT-B/16 (random weights), 224 px: Pearson mean / min · same peak",
}
HEADER = ["method", "paper", "reference code", "mmel follows / changes", *MODELS.values()]
PROMPTS = ["a red circle", "a blue square"]
WRITE = os.environ.get("MMEL_WRITE_PARITY") == "1"


# ------------------------------------------------------------------------------------------ the docs table
def _read_rows() -> dict[str, list[str]]:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise AssertionError(f"{DOC}: the generated table's markers {BEGIN} / {END} are missing")
    rows = {}
    for line in text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells
    return rows


def _write_rows(rows: dict[str, list[str]]) -> None:
    order = [c.method for c in P.CASES]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(rows[m]) + " |" for m in order if m in rows]
    text = DOC.read_text()
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    DOC.write_text(head + "\n" + "\n".join(lines) + "\n" + tail)


def _described(case: P.Case) -> list[str]:
    return [case.method, case.paper, case.code, case.follows]


def _check_cell(case: P.Case, model: str, value: str) -> None:
    rows = _read_rows()
    column = 4 + list(MODELS).index(model)
    if WRITE:
        row = rows.get(case.method, _described(case) + ["—"] * len(MODELS))
        row[column] = value
        rows[case.method] = row
        _write_rows(rows)
        return
    assert case.method in rows, f"docs/parity.md has no row for {case.method!r}; refresh with MMEL_WRITE_PARITY=1"
    assert rows[case.method][column] == value, (
        f"docs/parity.md says {rows[case.method][column]!r} for {case.method} on {model}, the test measured "
        f"{value!r}; refresh with MMEL_WRITE_PARITY=1"
    )


def test_parity_table_describes_every_case():
    rows = _read_rows()
    if WRITE:
        for case in P.CASES:
            rows[case.method] = _described(case) + rows.get(case.method, [""] * 4 + ["—"] * len(MODELS))[4:]
        _write_rows(rows)
        rows = _read_rows()
    for case in P.CASES:
        assert rows.get(case.method, [])[:4] == _described(case), f"docs/parity.md: row {case.method!r} is stale"
    assert set(rows) == {c.method for c in P.CASES}


# ------------------------------------------------------------------------------------------------ parity
@pytest.fixture(scope="module")
def tiny():
    from mmel.backbone import load_clip

    clip = load_clip("mmel-tiny", "shapes")
    return clip, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vitb16():
    from mmel.backbone import load_clip

    torch.manual_seed(0)
    clip = load_clip("ViT-B-16")  # random weights: no download
    return clip, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _parity(case: P.Case, model: str, clip, images) -> None:
    if case.reference is P.legrad_ref and P.import_legrad() is None:
        pytest.skip("legrad-torch is not installed (make install installs it from requirements/test-nodeps.txt)")
    r, same = P.measure(case, clip, images, PROMPTS, build_explainer)
    assert min(r) >= 0.999, f"{case.method} on {model}: Pearson per map {np.round(r, 5).tolist()}"
    differ = [i for i, s in enumerate(same) if not s]
    assert not differ, f"{case.method} on {model}: the peak patch differs for maps {differ}"
    _check_cell(case, model, f"{np.mean(r):.3f} / {min(r):.3f} · {sum(same)}/{len(same)}")


@pytest.mark.parametrize("case", P.CASES, ids=[c.method for c in P.CASES])
def test_parity_tiny(case, tiny):
    _parity(case, "tiny", *tiny)


@pytest.mark.slow
@pytest.mark.parametrize("case", P.CASES, ids=[c.method for c in P.CASES])
def test_parity_vitb16(case, vitb16):
    _parity(case, "vitb16", *vitb16)


# ------------------------------------------------------------------------------- pieces the parity rests on
@pytest.mark.parametrize(("cells", "up"), [(8, 72), (8, 36), (7, 45), (2, 9), (1, 5)])
def test_rise_upsampling_is_scikit_image_reflect(cells, up):
    """The explainer's [up, cells] interpolation matrix equals scipy.ndimage.zoom(order=1, mode='mirror',
    grid_mode=True), which is what scikit-image's resize(order=1, mode='reflect', anti_aliasing=False) runs
    (float64 on both sides: agreement to 1e-12, the last bits of a few multiply-adds)."""
    from mmel.explainers.rise import reflect_linear_matrix

    grid = np.random.default_rng(cells).random((cells, cells))
    m = reflect_linear_matrix(cells, up).numpy()
    ref = ndimage.zoom(grid, up / cells, order=1, mode="mirror", grid_mode=True)
    np.testing.assert_allclose(m @ grid @ m.T, ref, atol=1e-12)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)


def test_rise_border_is_not_clamped():
    """At the border the reflect mode blends the edge cell with its neighbour; a clamped (bilinear) upsampling
    would repeat the edge cell: one cell on, at the left edge, u(0) = (0.5)·2/8 − 0.5 = −0.375 -> mirrored 0.375."""
    from mmel.explainers.rise import reflect_linear_matrix

    m = reflect_linear_matrix(2, 8)
    torch.testing.assert_close(m[0], torch.tensor([0.625, 0.375], dtype=torch.float64))


def test_labels_name_the_variant_and_the_templates(micro_clip):
    assert build_explainer("gradcam", micro_clip).label == "gradcam[variant=native]"
    assert build_explainer("attention", micro_clip, variant="grad_eclip_paper").label == (
        "attention[variant=grad_eclip_paper]"
    )
    assert build_explainer("clearclip", micro_clip).label == "clearclip"
    assert build_explainer("maskclip", micro_clip, templates="authors").label == "maskclip[templates=authors]"
    with pytest.raises(ValueError, match="gradcam: variant"):
        build_explainer("gradcam", micro_clip, variant="paper")
    with pytest.raises(ValueError, match="layer=-1"):
        build_explainer("gradcam", micro_clip, variant="grad_eclip_paper", layer=0)
    with pytest.raises(ValueError, match="clip_surgery: templates"):
        build_explainer("clip_surgery", micro_clip, templates="imagenet")


def test_authors_templates_are_the_normalised_mean_of_templated_embeddings(micro_clip):
    """templates=authors: per prompt, normalise(mean_t normalise(encode_text(template_t(prompt)))) — the authors'
    ensemble — with their lists: 80 (ClearCLIP), 80 + 5 scene templates (CLIP Surgery, MaskCLIP)."""
    from mmel.explainers.templates import AUTHORS

    assert [len(AUTHORS[m]) for m in ("clearclip", "clip_surgery", "maskclip")] == [80, 85, 85]
    assert len(set(AUTHORS["clip_surgery"])) == 85 and "this is one {} in the scene." in AUTHORS["maskclip"]
    assert all(re.fullmatch(r"[^{}]*\{\}[^{}]*", t) for t in AUTHORS["clip_surgery"])
    e = build_explainer("clearclip", micro_clip, templates="authors")
    feats = e.text_features(PROMPTS)
    for k, p in enumerate(PROMPTS):
        ref = P.text_embeddings(micro_clip, [t.format(p) for t in AUTHORS["clearclip"]]).mean(0)
        torch.testing.assert_close(feats[k], ref / ref.norm(), atol=1e-5, rtol=0)
    plain = build_explainer("clearclip", micro_clip)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (e(images, PROMPTS) - plain(images, PROMPTS)).abs().max() > 1e-3
