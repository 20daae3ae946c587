"""The explorer's page (Gradio): wires the app's logic modules to components; no computing of its own.

Handlers never raise: :class:`~mmel.app.inputs.InputError` (and, as a last resort, any other exception of one
request) becomes a message in the status box, so a bad request cannot take the server down. Each element a
test or a user script needs has an ``elem_id``.
"""

from __future__ import annotations

import atexit
import html
import logging
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmel.app import core, inputs, models
from mmel.app import samples as sample_sets
from mmel.app.inputs import InputError

log = logging.getLogger(__name__)

CSS = """
#status .prose p { margin: 0.2em 0; }
.mmel-tok { padding: 1px 3px; margin: 1px; border-radius: 3px; display: inline-block; color: #000; }
.mmel-table td, .mmel-table th { padding: 2px 8px; }
"""


def _message(lines: Sequence[str]) -> str:
    return "\n\n".join(lines)


def _warn(text: str) -> str:
    return f"⚠️ {text}"


def load_upload(path: str | None, max_side: int) -> tuple[dict | None, Any, str]:
    """Upload handler: (source state, preview image, status text)."""
    try:
        img = inputs.read_upload(path)
    except InputError as e:
        return None, None, _warn(str(e))
    img, note = inputs.fit_image(img, max_side)
    src = {"image": img, "label": Path(path).name, "boxes": None, "note": note}
    return src, core.enlarge(img), note or f"Loaded {Path(path).name} ({img.width}×{img.height})."


def load_sample(
    samples: sample_sets.ShapesSamples, split: str, index: float | None
) -> tuple[dict | None, Any, Any, str]:
    """Sample handler: (source state, preview, prompts text, status text)."""
    import gradio as gr

    try:
        note = samples.ensure()
        s = samples.sample(split, int(index or 0))
    except InputError as e:
        return None, None, gr.update(), _warn(str(e))
    src = {"image": s.image, "label": s.label, "boxes": s.boxes, "note": None}
    status = [f"Loaded {s.label}: ground truth for {len(s.boxes)} prompt(s)."] + ([note] if note else [])
    return src, core.enlarge(s.image), "\n".join(s.boxes), _message(status)


def _details_html(
    results: Sequence[core.Explanation], metrics: dict[tuple[str, str], dict] | None, gt_prompts: set[str]
) -> str:
    """Scores per prompt, per-item metrics (boxes mode) and token weights, as small HTML tables."""
    if not results:
        return ""
    first = results[0]
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(p)}</td><td>{s:.4f}</td><td>{'yes' if p in gt_prompts else '—'}</td></tr>"
        for p, s in zip(first.prompts, first.scores, strict=True)
    )
    out = [
        "<h4>CLIP's cosine score per prompt</h4>",
        f"<table class='mmel-table' id='scores'><tr><th>prompt</th><th>cosine</th><th>ground truth</th></tr>{rows}"
        "</table>",
    ]
    if metrics is not None:
        body = "".join(
            f"<tr><td>{esc(r.explainer)}</td><td>{esc(p)}</td>"
            + (
                f"<td>{'hit' if m['pointing'] >= 0.5 else 'miss'}</td><td>{m['energy']:.3f}</td><td>{m['iou']:.3f}</td>"
                if (m := metrics.get((r.explainer, p)))
                else "<td colspan='3'>no ground truth for this prompt</td>"
            )
            + "</tr>"
            for r in results
            for p in r.prompts
        )
        out += [
            "<h4>Per-item metrics (ground-truth boxes)</h4>",
            "<table class='mmel-table' id='metrics'><tr><th>explainer</th><th>prompt</th><th>pointing</th>"
            f"<th>energy</th><th>IoU</th></tr>{body}</table>",
        ]
    for r in results:
        if r.tokens is None:
            continue
        out.append(f"<h4>Token weights — {esc(r.explainer)}</h4>")
        for p, toks in zip(r.prompts, r.tokens, strict=True):
            top = max((w for _, w in toks), default=0.0) or 1.0
            spans = "".join(
                f"<span class='mmel-tok' title='{w:.3f}' style='background: rgba(255,60,0,{w / top:.2f})'>"
                f"{esc(t)}</span>"
                for t, w in toks
            )
            out.append(f"<div class='mmel-tokens'><b>{esc(p)}</b>: {spans}</div>")
    times = ", ".join(f"{esc(r.explainer)} {r.seconds:.2f} s" for r in results)
    out.append(f"<p>compute: {times}</p>")
    return "\n".join(out)


def _gallery(state: dict, alpha: float, boxes_mode: bool) -> list[tuple[Any, str]]:
    img, boxes = state["image"], state.get("boxes") if boxes_mode else None
    items = []
    for r in state["results"]:
        for k, p in enumerate(r.prompts):
            bx = None if boxes is None else boxes.get(p)
            items.append((core.render(img, r.maps[k], alpha, bx), f"{r.explainer} · {p} · cos {r.scores[k]:.3f}"))
    return items


def _metrics(state: dict, tolerance: float) -> dict[tuple[str, str], dict] | None:
    boxes = state.get("boxes")
    if not boxes:
        return None
    return {
        (r.explainer, p): sample_sets.item_metrics(r.maps[k], boxes[p], tolerance)
        for r in state["results"]
        for k, p in enumerate(r.prompts)
        if p in boxes
    }


def run_request(
    cache: models.ModelCache,
    source: dict | None,
    prompts_text: str,
    choices: Sequence[str] | None,
    extra_checkpoints: str,
    backbone: str,
    weights: str,
    boxes_mode: bool,
    alpha: float,
    tolerance: float,
    out_dir: Path,
) -> tuple[str, list, str, str | None, dict | None]:
    """The Explain button: (status text, gallery items, details HTML, zip path, result state)."""
    empty = ("", [], "", None, None)
    try:
        if source is None:
            raise InputError("Image: none given; upload an image or load a sample from the shapes world.")
        prompts = inputs.parse_prompts(prompts_text)
        extra = [line.strip() for line in (extra_checkpoints or "").splitlines() if line.strip()]
        chosen = list(choices or []) + [f"mmel{models.CHECKPOINT_SEP}{p}" for p in extra]
        if not chosen:
            raise InputError("Explainers: choose at least one (or give an HSRM checkpoint path).")
        cache.clip(backbone, weights)  # a backbone problem is one message, not one per explainer
    except InputError as e:
        return (_warn(str(e)), *empty[1:])
    notes = [source["note"]] if source.get("note") else []
    results = []
    for choice in dict.fromkeys(chosen):  # keeps order, drops repeats
        try:
            results.append(core.explain(cache, backbone, choice, source["image"], prompts, weights))
        except InputError as e:
            notes.append(_warn(f"{choice}: {e}"))
        except Exception as e:  # noqa: BLE001 — one failing explainer must not take the others (or the server) down
            log.exception("explainer %s failed", choice)
            notes.append(_warn(f"{choice} failed: {type(e).__name__}: {e}"))
    if not results:
        return (_message(notes), *empty[1:])
    state = {"image": source["image"], "boxes": source.get("boxes"), "results": results}
    shown = state if boxes_mode else {**state, "boxes": None}
    metrics = _metrics(shown, tolerance) if boxes_mode else None
    if boxes_mode and not source.get("boxes"):
        notes.append("Boxes mode: this image has no ground truth (load a sample from the shapes world).")
    zip_path = core.overlays_zip(
        state["image"], results, alpha, out_dir / f"overlays-{uuid.uuid4().hex[:8]}.zip", shown["boxes"], metrics
    )
    notes.insert(0, f"Explained {source['label']} for {len(prompts)} prompt(s) with {len(results)} explainer(s).")
    gt = set(source.get("boxes") or {})
    info = _details_html(results, metrics, gt)
    return _message(notes), _gallery(shown, alpha, boxes_mode), info, str(zip_path), state


def build_app(
    cache: models.ModelCache | None = None,
    samples: sample_sets.ShapesSamples | None = None,
    *,
    logs: str | Path = "logs",
    checkpoints: Sequence[str | Path] = (),
    max_side: int = inputs.MAX_SIDE,
    tolerance: float | None = None,
    workdir: str | Path | None = None,
):
    """The page as a ``gr.Blocks`` (not launched). Models load on first use, once, into ``cache``."""
    import gradio as gr

    cache = cache or models.ModelCache()
    samples = samples or sample_sets.ShapesSamples(models.repo_root() / "data" / "shapes")
    tolerance = sample_sets.pointing_tolerance() if tolerance is None else tolerance
    if workdir is None:  # the zips of this process; removed when it exits
        workdir = tempfile.mkdtemp(prefix="mmel-app-")
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    out_dir = Path(workdir)
    found = [str(p) for p in checkpoints] + [str(p) for p in models.find_checkpoints(logs)]
    choices = models.explainer_choices(dict.fromkeys(found))
    backbones = [(s.label, k) for k, s in cache.specs.items()]

    with gr.Blocks(title="mmel explorer", analytics_enabled=False) as demo:
        demo.mmel_workdir = out_dir  # where the zips go (launch() must allow it)
        gr.Markdown(
            "## mmel explorer — where does CLIP look?\n"
            "Upload an image (or load a sample of the shapes world), write prompts one per line, pick explainers "
            "and press **Explain**. Each row of overlays is one explainer, each column one prompt; "
            "the ring marks the map's peak."
        )
        source = gr.State(None)
        result = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                upload = gr.File(label="Upload an image", file_count="single", type="filepath", elem_id="upload")
                with gr.Group():
                    with gr.Row():
                        split = gr.Dropdown(["train", "val", "test"], value="test", label="split", elem_id="split")
                        index = gr.Number(value=0, precision=0, minimum=0, label="image index", elem_id="index")
                    sample_btn = gr.Button("Load a shapes-world sample", elem_id="load-sample")
                preview = gr.Image(label="Input", type="pil", interactive=False, height=220, elem_id="preview")
                prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="prompts")
                explainers = gr.CheckboxGroup(choices, value=["grad_eclip"], label="Explainers", elem_id="explainers")
                extra = gr.Textbox(label="HSRM checkpoints (hsrm.pt paths, one per line)", lines=1, elem_id="ckpts")
                backbone = gr.Dropdown(backbones, value=models.DEFAULT_BACKBONE, label="Backbone", elem_id="backbone")
                weights = gr.Textbox(label="Weights file (optional; replaces the config's weights)", elem_id="weights")
                boxes_mode = gr.Checkbox(label="Boxes mode: ground truth + per-item metrics", elem_id="boxes")
                run = gr.Button("Explain", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
                gallery = gr.Gallery(
                    label="Overlays", columns=2, object_fit="contain", height="auto", elem_id="gallery", preview=False
                )
                download = gr.DownloadButton("Download overlays (zip)", elem_id="download", interactive=False)
                details = gr.HTML(elem_id="details")

        # the file slot is emptied after each upload (the preview shows what was loaded), so another can follow
        upload.upload(lambda p: (*load_upload(p, max_side), None), [upload], [source, preview, status, upload])
        sample_btn.click(lambda s, i: load_sample(samples, s, i), [split, index], [source, preview, prompts, status])

        def on_run(src, text, chosen, ckpts, bb, w, bm, a):
            try:
                msg, items, info, zip_path, state = run_request(
                    cache, src, text, chosen, ckpts, bb, w, bm, a, tolerance, out_dir
                )
            except Exception as e:  # noqa: BLE001 — last resort: the page says what broke, the server stays up
                log.exception("request failed")
                msg, items, info, zip_path, state = _warn(f"{type(e).__name__}: {e}"), [], "", None, None
            cols = len(state["results"][0].prompts) if state else 2
            dl = gr.DownloadButton(value=zip_path, interactive=zip_path is not None)
            return msg, gr.Gallery(value=items, columns=max(1, cols)), info, dl, state

        run.click(
            on_run,
            [source, prompts, explainers, extra, backbone, weights, boxes_mode, alpha],
            [status, gallery, details, download, result],
        )

        def on_view(state, a, bm):
            if not state:
                return gr.update(), gr.update(), gr.update()
            shown = state if bm else {**state, "boxes": None}
            metrics = _metrics(shown, tolerance) if bm else None
            name = out_dir / f"overlays-{uuid.uuid4().hex[:8]}.zip"
            path = core.overlays_zip(state["image"], state["results"], a, name, shown["boxes"], metrics)
            info = _details_html(state["results"], metrics, set(state.get("boxes") or {}))
            return _gallery(shown, a, bm), info, gr.DownloadButton(value=str(path), interactive=True)

        alpha.release(on_view, [result, alpha, boxes_mode], [gallery, details, download])
        boxes_mode.change(on_view, [result, alpha, boxes_mode], [gallery, details, download])
    return demo


def serve(demo, host: str = "127.0.0.1", port: int | None = 7860, *, share: bool = False, concurrency: int = 4,
          block: bool = True) -> None:  # fmt: skip
    """Queue (``concurrency`` requests computed at once) and launch on ``host:port``; ``block=False`` returns once
    the server is up (tests)."""
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(demo.mmel_workdir)],
        css=CSS,
        prevent_thread_lock=not block,
        quiet=not block,
    )
