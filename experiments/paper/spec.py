"""A paper spec (``experiments/paper/<name>.yaml``) as a typed, checked object, and one spec per backbone.

:class:`PaperSpec` is what the YAML may say, nothing more: an unknown key, a table naming an explainer the spec
does not define, or a value of the wrong kind is an error that names the file and the key — a typo never drops a
table silently. The plan (:mod:`.plan`) reads only this object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

SPECS = Path(__file__).resolve().parent
# the tables the runner draws itself (besides those listed under `tables:`), whose columns a spec may extend
BUILTIN_TABLES = ("localisation", "faithfulness", "trust")


class SpecError(ValueError):
    """A paper spec that does not say what the runner can do (the message names the file and the key)."""


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | int | float | bool) for v in value):
        raise SpecError(f"{where}: expected a list of overrides (strings), got {value!r}")
    return tuple(str(v) for v in value)


def _limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{where}: expected a positive integer or null, got {value!r}")
    return int(value)


def _mapping(value: Any, where: str, keys: set[str] | None = None) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {value!r}")
    if keys is not None and set(value) - keys:
        raise SpecError(f"{where}: unknown keys {sorted(set(value) - keys)}; expected some of {sorted(keys)}")
    return value


@dataclass(frozen=True)
class Method:
    """One explainer row: its evaluate.py overrides and its own sample cap (an expensive method scored on the first
    ``limit`` samples; its label says so)."""

    overrides: tuple[str, ...]
    limit: int | None = None

    @property
    def is_mmel(self) -> bool:
        """MMEL rows are evaluated once per training seed, each with that seed's checkpoint."""
        return "explainer=mmel" in self.overrides


@dataclass(frozen=True)
class TableSpec:
    """A table of evaluate runs: which explainers, the overrides added to each, a sample cap, the columns it adds
    by output name (``{label: output}``), and (Table 2 only) Grad-ECLIP's own protocol as an extra row."""

    explainers: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    limit: int | None = None
    title: str = ""
    columns: tuple[tuple[str, str], ...] = ()
    protocol: tuple[str, ...] = ()
    # a table of variants (`variants: {column label: [overrides]}`, e.g. a benchmark's splits): one run set per
    # (explainer, variant), one column per variant showing `output`
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()
    output: str = ""
    backbones: tuple[str, ...] = ()  # the backbones (labels of `backbones:`) that get this table; empty: all


@dataclass(frozen=True)
class GridSpec:
    """The qualitative grid: ``items`` seeded test items, one column per explainer (maps saved by their runs)."""

    items: int
    seed: int
    explainers: tuple[str, ...]


@dataclass(frozen=True)
class PaperSpec:
    name: str
    explainers: dict[str, Method]
    seeds: tuple[int, ...]
    title: str = ""
    source: str = "<spec>"
    overrides: tuple[str, ...] = ()
    evaluate_overrides: tuple[str, ...] = ()
    limit: int | None = None
    columns: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    compare: tuple[str, str] | None = None
    faithfulness: TableSpec | None = None
    phrases: TableSpec | None = None
    ablation_overrides: tuple[str, ...] = ()
    ablations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    trust: TableSpec | None = None
    # further metric tables by name (`tables: {name: {title, explainers, overrides, limit, columns}}`): a benchmark
    # joins the paper as a spec entry, with the columns its metrics declare
    tables: dict[str, TableSpec] = field(default_factory=dict)
    grid: GridSpec | None = None
    backbones: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def display_title(self) -> str:
        return self.title or self.name

    def method(self, label: str) -> Method:
        if label not in self.explainers:
            raise SpecError(f"{self.source}: {label!r} is not among its explainers {list(self.explainers)}")
        return self.explainers[label]

    @classmethod
    def parse(cls, raw: Mapping[str, Any], source: str = "<spec>") -> PaperSpec:
        """Check a spec read from YAML (or given as a dict) and type it; every error names ``source`` and the key."""
        known = {f.name for f in fields(cls)} - {"source"}
        raw = _mapping(raw, source, known)
        missing = {"name", "explainers", "seeds"} - set(raw)
        if missing:
            raise SpecError(f"{source}: missing keys {sorted(missing)}")
        explainers: dict[str, Method] = {}
        for label, entry in _mapping(raw["explainers"], f"{source}: explainers").items():
            where = f"{source}: explainers.{label}"
            if isinstance(entry, Mapping):
                e = _mapping(entry, where, {"overrides", "limit"})
                explainers[str(label)] = Method(_strings(e.get("overrides"), where), _limit(e.get("limit"), where))
            else:
                explainers[str(label)] = Method(_strings(entry, where))
        seeds = raw["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise SpecError(f"{source}: seeds: expected a non-empty list of integers, got {seeds!r}")

        def rows(labels: Any, where: str) -> tuple[str, ...]:
            out = _strings(labels, where)
            unknown = [x for x in out if x not in explainers]
            if unknown:
                raise SpecError(f"{where}: {unknown} are not among the spec's explainers {list(explainers)}")
            return out

        def cols(value: Any, where: str) -> tuple[tuple[str, str], ...]:
            return tuple((str(k), str(v)) for k, v in _mapping(value, where).items())

        def table(key: str, value: Any, allowed: set[str]) -> TableSpec | None:
            if value is None:
                return None
            where = f"{source}: {key}"
            t = _mapping(value, where, allowed)
            if "explainers" not in t:
                raise SpecError(f"{where}: missing key 'explainers'")
            variants = tuple((str(k), _strings(v, f"{where}.variants.{k}"))
                             for k, v in _mapping(t.get("variants"), f"{where}.variants").items())  # fmt: skip
            if variants and not t.get("output"):
                raise SpecError(f"{where}: a table of variants needs `output` (the output each column shows)")
            if variants and t.get("columns"):
                raise SpecError(f"{where}: a table of variants shows one `output` per variant; it takes no `columns`")
            return TableSpec(
                explainers=rows(t["explainers"], f"{where}.explainers"),
                overrides=_strings(t.get("overrides"), f"{where}.overrides"),
                limit=_limit(t.get("limit"), f"{where}.limit"),
                title=str(t.get("title") or ""),
                columns=cols(t.get("columns"), f"{where}.columns"),
                protocol=_strings(t.get("protocol"), f"{where}.protocol"),
                variants=variants,
                output=str(t.get("output") or ""),
                backbones=_strings(t.get("backbones"), f"{where}.backbones"),
            )

        columns = {str(k): cols(v, f"{source}: columns.{k}") for k, v in _mapping(raw.get("columns"), source).items()}
        unknown = sorted(set(columns) - set(BUILTIN_TABLES))
        if unknown:
            raise SpecError(f"{source}: columns for unknown tables {unknown}; expected "
                            f"{', '.join(BUILTIN_TABLES)} (a `tables:` entry takes its own columns)")  # fmt: skip
        compare = raw.get("compare")
        if compare is not None:
            compare = rows(compare, f"{source}: compare")
            if len(compare) != 2:
                raise SpecError(f"{source}: compare: expected two explainer labels, got {list(compare)}")
        grid = None
        if raw.get("grid") is not None:
            g = _mapping(raw["grid"], f"{source}: grid", {"items", "seed", "explainers"})
            grid = GridSpec(int(_limit(g.get("items", 6), f"{source}: grid.items") or 6), int(g.get("seed", 0)),
                            rows(g.get("explainers"), f"{source}: grid.explainers"))  # fmt: skip
        extra = {}
        for key, value in _mapping(raw.get("tables"), f"{source}: tables").items():
            if key in (*BUILTIN_TABLES, "phrases", "ablations"):
                raise SpecError(f"{source}: tables.{key}: the name of a built-in table; choose another")
            allowed = {"title", "explainers", "overrides", "limit", "columns", "variants", "output", "backbones"}
            t = table(f"tables.{key}", value, allowed)
            if t is not None:
                extra[str(key)] = t if t.title else replace(t, title=str(key))
        ablations = {str(k): _strings(v, f"{source}: ablations.{k}")
                     for k, v in _mapping(raw.get("ablations"), f"{source}: ablations").items()}  # fmt: skip
        backbones = {str(k): _strings(v, f"{source}: backbones.{k}")
                     for k, v in _mapping(raw.get("backbones"), f"{source}: backbones").items()}  # fmt: skip
        for key, t in extra.items():
            unknown = [b for b in t.backbones if b not in backbones]
            if unknown:
                raise SpecError(f"{source}: tables.{key}.backbones: {unknown} are not among {list(backbones)}")
        return cls(
            name=str(raw["name"]),
            explainers=explainers,
            seeds=tuple(int(s) for s in seeds),
            title=str(raw.get("title") or ""),
            source=source,
            overrides=_strings(raw.get("overrides"), f"{source}: overrides"),
            evaluate_overrides=_strings(raw.get("evaluate_overrides"), f"{source}: evaluate_overrides"),
            limit=_limit(raw.get("limit"), f"{source}: limit"),
            columns=columns,
            compare=compare,  # type: ignore[arg-type]
            faithfulness=table(
                "faithfulness", raw.get("faithfulness"), {"explainers", "overrides", "limit", "columns", "protocol"}
            ),  # fmt: skip
            phrases=table("phrases", raw.get("phrases"), {"explainers", "overrides", "limit"}),
            ablation_overrides=_strings(raw.get("ablation_overrides"), f"{source}: ablation_overrides"),
            ablations=ablations,
            trust=table("trust", raw.get("trust"), {"explainers", "overrides", "limit"}),
            tables=extra,
            grid=grid,
            backbones=backbones,
        )


def load_spec(name: str) -> PaperSpec:
    """The spec ``experiments/paper/<name>.yaml`` (or a path to one), checked; clear errors for unknown names."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPECS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPECS.glob("*.yaml"))
        raise FileNotFoundError(f"paper spec {name!r} not found ({path}); known: {known}")
    return PaperSpec.parse(yaml.load(path.read_text(), Loader=_UniqueKeys) or {}, str(path))


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML keeps the last one:
    a second ``tables:`` would silently drop the first's tables)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"{self.name}: line {key_node.start_mark.line + 1}: the key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def as_spec(spec: PaperSpec | Mapping[str, Any]) -> PaperSpec:
    return spec if isinstance(spec, PaperSpec) else PaperSpec.parse(spec)


def per_backbone(spec: PaperSpec | Mapping[str, Any], results: Path) -> list[tuple[PaperSpec, Path]]:
    """A spec with ``backbones: {label: [overrides]}`` is one spec per backbone (its overrides appended, results
    in ``results/<backbone>/``); a spec without is itself."""
    spec = as_spec(spec)
    if not spec.backbones:
        return [(spec, results)]
    return [
        (
            replace(spec, backbones={}, overrides=(*spec.overrides, *over), title=f"{spec.display_title} — {label}",
                    tables={k: t for k, t in spec.tables.items() if not t.backbones or label in t.backbones}),
            results / slug(label),
        )
        for label, over in spec.backbones.items()
    ]  # fmt: skip


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")
