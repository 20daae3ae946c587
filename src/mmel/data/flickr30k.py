"""Flickr30k Entities as grounding samples: one sample per (image, caption phrase that has boxes).

Layout (the official release plus the Flickr30k images)::

    <root>/Sentences/<image_id>.txt      5 captions, phrases marked "[/EN#<entity id>/<type>[/<type>...] words]"
    <root>/Annotations/<image_id>.xml    PASCAL-VOC-like: <size>, <object> with one or more <name>=entity id and
                                         either <bndbox> (1-based inclusive pixel corners), <nobndbox> or <scene>
    <root>/flickr30k-images/<image_id>.jpg
    <root>/{train,val,test}.txt          official split files, one image id per line

Entity ids are per image and shared by the 5 captions; one box may belong to several entities (several <name>s)
and one entity may have several boxes (all are kept). Phrases whose entity has no box are skipped and counted:
``phrase_notvisual`` (type notvisual / entity 0), ``phrase_scene`` (<scene>), ``phrase_no_box`` (<nobndbox> or
no <object> at all). VOC corners are 1-based and inclusive, so the pixel-edge box is (xmin-1, ymin-1, xmax, ymax).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmel.data.base import BoxDataset, DatasetError, Record, clean_boxes
from mmel.data.coco import check_template

MARK = "[/EN#"


@dataclass
class Phrase:
    """A marked phrase of one caption."""

    text: str
    entity_id: str
    types: list[str]
    first_word: int  # index of the phrase's first word in the caption


@dataclass
class Caption:
    text: str  # the caption without markup
    phrases: list[Phrase]


@dataclass
class ImageBoxes:
    """What an Annotations/<id>.xml says about one image."""

    size: tuple[int, int]  # (H, W)
    boxes: dict[str, list[list[float]]] = field(default_factory=lambda: defaultdict(list))  # entity id -> xyxy
    scene: set[str] = field(default_factory=set)
    nobox: set[str] = field(default_factory=set)


def parse_caption(line: str) -> Caption:
    """Parse one marked caption; raises ``ValueError`` on unbalanced markup."""
    words: list[str] = []
    phrases: list[Phrase] = []
    i = 0
    while i < len(line):
        start = line.find(MARK, i)
        if start < 0:
            words += line[i:].split()
            break
        words += line[i:start].split()
        end = line.find("]", start)
        if end < 0:
            raise ValueError(f"unterminated phrase at column {start + 1}")
        if line.find(MARK, start + 1, end) >= 0:
            raise ValueError(f"nested phrase at column {start + 1}")
        space = line.find(" ", start, end)
        tag = line[start + 1 : space if space >= 0 else end]  # "/EN#12/people/other"
        parts = tag.split("/")
        if len(parts) < 3 or not parts[1].startswith("EN#") or not parts[1][3:]:
            raise ValueError(f"bad phrase tag {tag!r} at column {start + 1}")
        text = line[space + 1 : end].split() if space >= 0 else []
        phrases.append(Phrase(" ".join(text), parts[1][3:], [t for t in parts[2:] if t], len(words)))
        words += text
        i = end + 1
    return Caption(" ".join(words), phrases)


def parse_sentences(path: Path) -> list[Caption | None]:
    """Captions of a Sentences/<id>.txt; a line with broken markup becomes ``None`` (the caller counts it)."""
    out: list[Caption | None] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(parse_caption(line.strip()))
        except ValueError:
            out.append(None)
    return out


def _int(el: ET.Element | None, tag: str, path: Path, where: str) -> float:
    node = el.find(tag) if el is not None else None
    if node is None or node.text is None:
        raise DatasetError(f"{path}: {where} has no <{tag}>")
    try:
        return float(node.text.strip())
    except ValueError as e:
        raise DatasetError(f"{path}: {where} <{tag}> is not a number: {node.text!r}") from e


def parse_annotation(path: Path) -> ImageBoxes:
    """Read an Annotations/<id>.xml (errors name the file and the element)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from e
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{path}: no <size> element")
    out = ImageBoxes(size=(int(_int(size, "height", path, "<size>")), int(_int(size, "width", path, "<size>"))))
    for k, obj in enumerate(root.iter("object")):
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        if not names:
            raise DatasetError(f"{path}: <object> #{k} has no <name> (entity id)")
        box = obj.find("bndbox")
        if box is not None:
            where = f"<object> #{k} <bndbox>"
            x0, y0, x1, y1 = (_int(box, t, path, where) for t in ("xmin", "ymin", "xmax", "ymax"))
            for n in names:
                out.boxes[n].append([x0 - 1.0, y0 - 1.0, x1, y1])
        elif obj.find("scene") is not None and (obj.findtext("scene") or "1").strip() != "0":
            out.scene.update(names)
        else:
            out.nobox.update(names)
    return out


def read_split(path: Path) -> list[str]:
    """Image ids of an official split file (one per line)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Flickr30k Entities split file not found: {path} (expected train.txt / val.txt / test.txt from the "
            "flickr30k_entities release, one image id per line; see data/README.md)"
        )
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file {path} is empty (expected one image id per line)")
    return ids


class Flickr30kEntities(BoxDataset):
    """Flickr30k Entities phrases as grounding samples.

    Args:
        root: folder holding Sentences/, Annotations/, the split files and (by default) flickr30k-images/.
        split: ``train`` / ``val`` / ``test`` (reads ``<root>/<split>.txt``).
        image_dir: image folder (default ``<root>/flickr30k-images``).
        prompt_template: filled with the phrase (default ``"{}"``: the phrase itself).
        lowercase: lower-case the phrase before filling the template.
        dedupe: keep one sample per (image, entity, phrase text) — the 5 captions often repeat a phrase.
            Off by default: the usual protocol scores every phrase occurrence.
        min_box_area, subset, seed, check_files: as in :class:`mmel.data.CocoBoxes`.

    Items carry ``phrase``, ``caption`` (full caption without markup), ``entity_id``, ``phrase_types``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        image_dir: str | os.PathLike | None = None,
        split_file: str | os.PathLike | None = None,
        prompt_template: str = "{}",
        lowercase: bool = False,
        dedupe: bool = False,
        min_box_area: float = 1.0,
        subset: int | None = None,
        seed: int = 0,
        check_files: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.split = split
        self.name = f"flickr30k/{split}"
        self.image_dir = Path(image_dir).expanduser() if image_dir else self.root / "flickr30k-images"
        self.prompt_template = check_template(prompt_template)
        self.lowercase = lowercase
        ids = read_split(Path(split_file).expanduser() if split_file else self.root / f"{split}.txt")
        for d in ("Sentences", "Annotations"):
            if not (self.root / d).is_dir():
                raise FileNotFoundError(f"Flickr30k Entities folder not found: {self.root / d}")
        for image_id in ids:
            self._index_image(image_id, dedupe, min_box_area)
        if check_files:
            self.drop_missing_images()
        self.subsample(subset, seed)

    def _index_image(self, image_id: str, dedupe: bool, min_box_area: float) -> None:
        sent = self.root / "Sentences" / f"{image_id}.txt"
        ann = self.root / "Annotations" / f"{image_id}.xml"
        if not sent.is_file() or not ann.is_file():
            self.skipped["image_no_annotation_files"] += 1
            return
        boxes = parse_annotation(ann)
        self.stats["images_annotated"] += 1
        clean = {e: clean_boxes(np.array(b), boxes.size, self.skipped, min_box_area) for e, b in boxes.boxes.items()}
        seen: set[tuple[str, str]] = set()
        for c, caption in enumerate(parse_sentences(sent)):
            if caption is None:
                self.skipped["caption_malformed"] += 1
                continue
            for p, ph in enumerate(caption.phrases):
                reason = self._no_box_reason(ph, boxes, clean) or ("phrase_empty" if not ph.text else None)
                if reason:
                    self.skipped[reason] += 1
                    continue
                if dedupe and (ph.entity_id, ph.text.lower()) in seen:
                    self.stats["phrase_duplicates_merged"] += 1
                    continue
                seen.add((ph.entity_id, ph.text.lower()))
                text = ph.text.lower() if self.lowercase else ph.text
                self.records.append(
                    Record(
                        sample_id=f"{image_id}:{c}:{p}",
                        image_id=image_id,
                        file=str(self.image_dir / f"{image_id}.jpg"),
                        size=boxes.size,
                        prompt=self.prompt_template.format(text),
                        boxes=clean[ph.entity_id],
                        category="/".join(ph.types),
                        extra={
                            "phrase": ph.text,
                            "caption": caption.text,
                            "entity_id": ph.entity_id,
                            "phrase_types": list(ph.types),
                        },
                    )
                )

    @staticmethod
    def _no_box_reason(ph: Phrase, ann: ImageBoxes, clean: dict[str, np.ndarray]) -> str | None:
        if ph.entity_id in clean:
            return None if len(clean[ph.entity_id]) else "phrase_boxes_degenerate"
        if ph.entity_id == "0" or "notvisual" in ph.types:
            return "phrase_notvisual"
        if ph.entity_id in ann.scene:
            return "phrase_scene"
        return "phrase_no_box"
