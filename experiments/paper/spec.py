"""A paper spec (``experiments/paper/<name>.yaml``): loading it with clear errors, and one spec per backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SPECS = Path(__file__).resolve().parent


def load_spec(name: str) -> dict[str, Any]:
    """The spec ``experiments/paper/<name>.yaml`` (or a path to one), with a clear error for unknown names."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPECS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPECS.glob("*.yaml"))
        raise FileNotFoundError(f"paper spec {name!r} not found ({path}); known: {known}")
    spec = yaml.safe_load(path.read_text()) or {}
    missing = {"name", "explainers", "seeds"} - set(spec)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}")
    return spec


def per_backbone(spec: dict[str, Any], results: Path) -> list[tuple[dict[str, Any], Path]]:
    """A spec with ``backbones: {label: [overrides]}`` is one spec per backbone (its overrides appended, results
    in ``results/<backbone>/``); a spec without is itself."""
    if not spec.get("backbones"):
        return [(spec, results)]
    out = []
    for label, over in spec["backbones"].items():
        sub = {k: v for k, v in spec.items() if k != "backbones"}
        sub["overrides"] = [*spec.get("overrides", []), *over]
        sub["title"] = f"{spec.get('title', spec['name'])} — {label}"
        sub["backbone"] = label  # a section may be limited to some backbones (benchmarks: `backbones:`)
        out.append((sub, results / slug(label)))
    return out


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")
