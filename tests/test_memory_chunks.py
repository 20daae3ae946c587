"""Memory-aware batching: explain_batch and the feature-cache build cut a batch into chunks whose estimated memory
fits the budget (more calls, same maps), instead of allocating past it."""

from __future__ import annotations

import torch

from mmel.explainers import build_explainer
from mmel.explainers.memory import chunk_size, estimate_bytes


def test_explain_batch_splits_a_batch_over_the_budget_into_chunks_with_the_same_maps(micro_clip, monkeypatch):
    e = build_explainer("grad_eclip", micro_clip)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 32, 32, generator=g)
    prompts = [["a red circle", "a blue square"], ["a cat"], ["a dog", "a car", "a tree"], ["a boat"], ["a sun"]]
    whole = e.explain_batch(images, prompts)
    calls = []
    original = type(e).raw_maps_text
    monkeypatch.setattr(type(e), "raw_maps_text", lambda self, x, t: calls.append(len(x)) or original(self, x, t))
    e.memory_budget = 2 * estimate_bytes(micro_clip, e, (32, 32), 3, 1)  # two images of K_max = 3 prompts
    chunked = e.explain_batch(images, prompts)
    assert calls == [2, 2, 1]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    calls.clear()
    e.memory_budget = 1  # below one image: one image per call (a single image is never refused here)
    e.explain_batch(images, prompts)
    assert calls == [1] * 5


def test_chunk_size_follows_the_budget(micro_clip):
    e = build_explainer("grad_eclip", micro_clip)
    one = estimate_bytes(micro_clip, e, (224, 224), 4, 1)
    assert chunk_size(micro_clip, e, (224, 224), 4, 64, None) == 64  # unknown free memory: no limit
    assert chunk_size(micro_clip, e, (224, 224), 4, 64, 10 * one) == 10
    assert chunk_size(micro_clip, e, (224, 224), 4, 64, 1000 * one) == 64
    assert chunk_size(micro_clip, e, (448, 448), 4, 64, 10 * one) < 10  # a larger input: fewer per call


def test_cache_build_pairs_per_pass_follow_the_budget(micro_clip, tmp_path):
    from mmel.hsrm.features import CachedFeatureDataModule

    e = build_explainer("grad_eclip", micro_clip, mode="native")

    class Base:
        transform = type("T", (), {"mode": "fixed"})()

    dm = CachedFeatureDataModule(Base(), e.layer_evidence, [0, 1], {"backbone": "mmel-micro"}, tmp_path,
                                 compute_batch_size=32, clip=micro_clip)  # fmt: skip
    assert dm._pairs_per_pass((32, 32)) == 32
    e.memory_budget = 3 * estimate_bytes(micro_clip, e, (32, 32), 1, 1)
    assert dm._pairs_per_pass((32, 32)) == 3
