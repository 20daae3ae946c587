"""Pretraining of the project's tiny CLIP (``mmel-tiny``) on the synthetic shapes world (docs/shapes_world.md).

``python -m mmel.pretrain --out PATH`` trains it (Lightning, deterministic on CPU for a given seed and thread
count) and writes an fp16 safetensors file that ``load_clip("mmel-tiny", pretrained=PATH)`` reads;
``load_clip("mmel-tiny", pretrained="shapes")`` finds the committed file via :func:`mmel.pretrain.tiny.resolve_weights`.
"""
