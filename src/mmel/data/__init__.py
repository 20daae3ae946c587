"""Datasets: the synthetic shapes world (:mod:`mmel.data.shapes`) and loaders for COCO / Flickr30k Entities."""
