"""One self-contained ``report.html`` per table set: tables, figures, the commands and config hashes that made them,
and the environment — readable offline (figures are embedded as data: URIs, no script, no external resource).

    write_report(path, title, sections, provenance)

A section is a heading, a short note, any number of :class:`experiments.tables.Table` and PNG figures. Provenance
is a list of (label, command, config hash) rows plus :func:`environment` (package versions, git commit, machine).
"""

from __future__ import annotations

import base64
import datetime as _dt
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from importlib import metadata
from pathlib import Path

from mmel.utils.runs import git_state

from .tables import Table

PACKAGES = ("mmel", "torch", "torchvision", "open_clip_torch", "pytorch-lightning", "torchmetrics", "numpy", "scipy")

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th[scope=row],thead th:first-child{text-align:left}thead th{background:#f3f3f3}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:560px;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}code,pre{background:#f6f6f6;font-size:.85em}pre{padding:.6em;overflow:auto}
.note{color:#444}.prov td{text-align:left}.legend{color:#444;font-size:.85em}
"""


@dataclass
class Section:
    title: str
    note: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (png path, caption)


@dataclass
class Provenance:
    label: str
    command: str
    config_hash: str


def environment() -> dict[str, str]:
    """Package versions, git commit (+ dirty flag), Python, machine and time: what a reader needs to rerun it."""
    env = {}
    for pkg in PACKAGES:
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    env["python"] = platform.python_version()
    env["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    env["git commit"] = git_commit()
    env["written"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return env


def git_commit(cwd: str | Path | None = None) -> str:
    """``<sha>`` (+ ``-dirty`` when tracked files changed), or ``unknown`` outside a git checkout."""
    state = git_state(Path(cwd) if cwd else Path(__file__).resolve().parents[1])
    if state["commit"] is None:
        return "unknown"
    return state["commit"] + ("-dirty" if state["dirty"] else "")


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def render(title: str, sections: Sequence[Section], provenance: Sequence[Provenance], env: dict[str, str]) -> str:
    """The report as one HTML string."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    for s in sections:
        parts.append(f"<h2>{escape(s.title)}</h2>")
        if s.note:
            parts.append(f"<p class='note'>{escape(s.note)}</p>")
        for t in s.tables:
            parts.append(f"<h3>{escape(t.title)}</h3>" + t.html())
        for path, caption in s.figures:
            alt = escape(caption)
            parts.append(f"<figure><img src='{_img(path)}' alt='{alt}'><figcaption>{alt}</figcaption></figure>")
    parts.append(
        "<h2>How these numbers were made</h2><table><thead><tr><th>run</th><th>command</th>"
        "<th>config hash</th></tr></thead><tbody>"
    )
    for p in provenance:
        parts.append(
            f"<tr><th scope='row'>{escape(p.label)}</th><td><code>{escape(p.command)}</code></td>"
            f"<td><code>{escape(p.config_hash)}</code></td></tr>"
        )
    parts.append("</tbody></table><h2>Environment</h2><table class='prov'><tbody>")
    parts += [f"<tr><th scope='row'>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in env.items()]
    parts.append("</tbody></table></body></html>\n")
    return "".join(parts)


def write_report(
    path: str | Path,
    title: str,
    sections: Sequence[Section],
    provenance: Sequence[Provenance] = (),
    env: dict[str, str] | None = None,
) -> Path:
    """Write ``report.html`` (atomically); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render(title, sections, provenance, env or environment()), encoding="utf-8")
    tmp.replace(path)
    return path
