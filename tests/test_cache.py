"""FeatureCache: second pass reads (no compute), identical tensors, key changes rebuild, interrupted builds resume."""

from __future__ import annotations

import json

import pytest
import torch

from mmel.data import FeatureCache, cache_key

KEY = cache_key("mmel-micro", None, layers=[2, 3], resolution=32, dataset="shapes/test")


class Items(list):
    """A list of item specs with the ``sample_ids`` attribute datasets have."""

    @property
    def sample_ids(self):
        return [f"s{i['n']}" for i in self]


def make_items(n: int) -> Items:
    # variable spatial size per item (keep-size mode), several dtypes
    return Items({"n": i, "h": 2 + i % 3, "w": 3 + i % 2} for i in range(n))


class Compute:
    """A deterministic compute_fn that counts its calls and items; can be told to fail at a given call."""

    def __init__(self, fail_at: int | None = None, bad: set[int] = frozenset()):
        self.calls = self.items = 0
        self.fail_at, self.bad = fail_at, bad

    def __call__(self, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash (out of memory, Ctrl-C, ...)")
        self.items += len(batch)
        out = []
        for it in batch:
            if it["n"] in self.bad:
                out.append(None)
                continue
            g = torch.Generator().manual_seed(it["n"])
            out.append(
                {
                    "evidence": torch.randn(2, it["h"], it["w"], generator=g),
                    "keys": torch.randn(2, it["h"] * it["w"], 5, generator=g).half(),
                    "text": torch.randn(7, generator=g).bfloat16(),
                    "n_tokens": torch.tensor(it["h"] * it["w"]),
                }
            )
        return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_second_pass_reads_from_cache_with_identical_tensors(tmp_path):
    items, fn = make_items(11), Compute()
    feats = FeatureCache(tmp_path / "c", KEY, shard_size=4).build(items, fn, batch_size=3)
    assert fn.items == 11 and len(feats) == 11
    again = Compute()
    feats2 = FeatureCache(tmp_path / "c", KEY, shard_size=4).build(items, again, batch_size=3)
    assert again.calls == 0, "a complete cache must not call compute_fn"
    reference = Compute()(items)
    for i in range(11):
        got = feats2[i]
        assert got["id"] == f"s{i}" and feats2.index(f"s{i}") == i
        _assert_same({k: v for k, v in got.items() if k != "id"}, reference[i])
    _assert_same({k: v for k, v in feats.get("s7").items() if k != "id"}, reference[7])
    assert feats2[-1]["id"] == "s10"
    with pytest.raises(IndexError):
        feats2[11]
    loaded = FeatureCache(tmp_path / "c", KEY, shard_size=4).load()
    assert torch.equal(loaded[3]["evidence"], reference[3]["evidence"])


def test_batched_dict_output_and_failed_items(tmp_path):
    def batched(batch):
        return {"x": torch.stack([torch.full((2, 3), float(it["n"])) for it in batch])}

    feats = FeatureCache(tmp_path, KEY, shard_size=5).build(make_items(7), batched, batch_size=2)
    assert torch.equal(feats[6]["x"], torch.full((2, 3), 6.0))
    feats = FeatureCache(tmp_path / "b", KEY).build(make_items(4), Compute(bad={2}), batch_size=4)
    assert feats[2] is None and feats[3] is not None


@pytest.mark.parametrize(
    "change",
    [
        {"layers": [1, 2, 3]},
        {"resolution": 64},
        {"backbone": "mmel-tiny"},
        {"weights": "shapes"},
    ],
)
def test_a_key_change_rebuilds(tmp_path, change):
    items = make_items(6)
    FeatureCache(tmp_path, KEY, shard_size=4).build(items, Compute())
    fn = Compute()
    FeatureCache(tmp_path, {**KEY, **change}, shard_size=4).build(items, fn)
    assert fn.items == 6
    assert json.loads((tmp_path / "cache.json").read_text())["key"] == json.loads(json.dumps({**KEY, **change}))
    with pytest.raises(ValueError, match="was built for key"):
        FeatureCache(tmp_path, KEY).load()


def test_changed_items_rebuild(tmp_path):
    FeatureCache(tmp_path, KEY).build(make_items(6), Compute())
    fn = Compute()
    FeatureCache(tmp_path, KEY).build(make_items(5), fn)  # a different data subset
    assert fn.items == 5
    fn = Compute()
    FeatureCache(tmp_path, KEY).build(make_items(5), fn)
    assert fn.calls == 0


def test_interrupted_build_resumes_without_recomputing_finished_shards(tmp_path):
    items = make_items(10)
    crash = Compute(fail_at=4)  # shard_size 4, batch 2: shard 0 = calls 1-2, shard 1 = 3-4 -> dies in shard 1
    cache = FeatureCache(tmp_path, KEY, shard_size=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.build(items, crash, batch_size=2)
    assert not cache.is_complete()
    with pytest.raises(ValueError, match="incomplete"):
        cache.load()
    resume = Compute()
    feats = FeatureCache(tmp_path, KEY, shard_size=4).build(items, resume, batch_size=2)
    assert resume.items == 6, "only the unfinished shards (items 4..9) are computed again"
    assert cache.is_complete(items.sample_ids)
    ref = Compute()(items)
    for i in range(10):
        assert torch.equal(feats[i]["keys"], ref[i]["keys"])


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        FeatureCache(tmp_path, KEY).build(make_items(2), Compute())
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError):
        FeatureCache(tmp_path / "none", KEY).load()
    with pytest.raises(ValueError, match="unique"):
        FeatureCache(tmp_path / "u", KEY).build([1, 2], Compute(), ids=["a", "a"])
    with pytest.raises(ValueError, match="sample_ids"):
        FeatureCache(tmp_path / "u", KEY).build([1, 2], Compute())
    with pytest.raises(ValueError, match="per-item dicts"):
        FeatureCache(tmp_path / "v", KEY).build(make_items(3), lambda b: [], batch_size=3)


def test_ranks_share_a_build_each_writing_its_own_shards(tmp_path):
    """Two workers (threads standing in for DDP ranks) build one cache; rank 0 writes the manifest last."""
    import threading

    items = make_items(10)  # shard_size 3 -> shards 0..3: rank 0 gets 0 and 2, rank 1 gets 1 and 3
    barrier = threading.Barrier(2)
    fns = [Compute(), Compute()]
    got: dict[int, object] = {}

    def rank(r):
        cache = FeatureCache(tmp_path, KEY, shard_size=3)
        got[r] = cache.build(items, fns[r], batch_size=2, rank=r, world_size=2, barrier=barrier.wait, progress=False)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (fns[0].items, fns[1].items) == (3 + 3, 3 + 1)
    manifest = json.loads((tmp_path / "cache.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"shard-0000{k}.arrow" for k in range(4)]
    assert sum(s["n"] for s in manifest["shards"]) == 10
    ref = Compute()(items)
    for r in (0, 1):
        for i in range(10):
            _assert_same({k: v for k, v in got[r][i].items() if k != "id"}, ref[i])
    with pytest.raises(ValueError, match="barrier"):
        FeatureCache(tmp_path / "x", KEY).build(items, Compute(), rank=1, world_size=2)


def test_a_half_written_or_damaged_cache_is_never_read_as_valid(tmp_path):
    items = make_items(7)
    cache = FeatureCache(tmp_path, KEY, shard_size=3)
    cache.build(items, Compute(), progress=False)
    manifest = json.loads((tmp_path / "cache.json").read_text())
    assert manifest["complete"] and len(manifest["content_sha256"]) == 64

    # killed after the shards, before the manifest (the last file written): incomplete, and resumable for free
    (tmp_path / "cache.json").unlink()
    (tmp_path / "shard-00002.arrow.tmp-999-1").write_bytes(b"half a shard")  # a write killed half-way
    with pytest.raises(ValueError, match="incomplete"):
        cache.load()
    assert not cache.is_complete()
    fn = Compute()
    cache.build(items, fn, progress=False)
    assert fn.calls == 0 and not list(tmp_path.glob("*.tmp-*"))

    # a shard changed behind the cache's back: caught by its size, or with verify=True by its hash
    shard = tmp_path / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match="missing or changed"):
        cache.load()
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache.load()  # same size: only the hash can tell
    with pytest.raises(ValueError, match="hash"):
        cache.load(verify=True)


def test_size_is_estimated_up_front_and_a_full_disk_refuses(tmp_path, monkeypatch, caplog):
    from collections import namedtuple

    import mmel.data.cache as cache_mod

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: usage(10**12, 0, 1000))  # 1 kB free
    items = make_items(8)
    fn = Compute()
    with caplog.at_level("INFO", logger="mmel.data.cache"), pytest.raises(OSError, match="only 1.00 kB is free"):
        FeatureCache(tmp_path / "a", KEY, shard_size=4).build(items, fn, batch_size=2, progress=False)
    assert fn.calls == 1, "the estimate comes from the first batch, before the rest is computed"
    assert "8 items" in caplog.text and "per item" in caplog.text
    assert not list((tmp_path / "a").glob("shard-*"))
    fn = Compute()
    with pytest.raises(OSError, match="feature_cache.enabled=false"):
        FeatureCache(tmp_path / "b", KEY).build(items, fn, expected_bytes=5e9, progress=False)
    assert fn.calls == 0, "a caller's estimate is checked before anything is computed"
    monkeypatch.undo()  # a disk with room: the interrupted build resumes
    assert len(FeatureCache(tmp_path / "a", KEY, shard_size=4).build(items, Compute(), progress=False)) == 8


def test_one_tensor_or_a_slice_of_it_reads_what_the_whole_row_holds(tmp_path):
    items = make_items(9)
    feats = FeatureCache(tmp_path / "c", KEY, shard_size=4).build(items, Compute(bad={4}), batch_size=3)
    for i in range(9):
        row = feats[i]
        if row is None:
            continue
        for name in ("evidence", "keys", "text", "n_tokens"):
            whole = feats.tensor(i, name)
            assert whole.dtype == row[name].dtype and torch.equal(whole, row[name])
        ev = row["evidence"]  # [2, h, w]
        for sl in (slice(0, 1), slice(1, 2), slice(0, 2), slice(1, 1)):
            part = feats.tensor(i, "evidence", sl)
            assert part.shape == ev[sl].shape and torch.equal(part, ev[sl])
        assert torch.equal(feats.tensor(i, "keys", slice(1, 2)), row["keys"][1:2])  # float16, still exact
    with pytest.raises(ValueError, match="contiguous"):
        feats.tensor(0, "evidence", slice(0, 2, 2))


def test_training_pairs_are_fetched_batchwise_as_each_row_stores_them(tmp_path):
    """The HSRM loader's pairs (one item per sample, dropped pairs and failed images None) fetched a batch at a time
    equal the per-pair slices of each image row, in any order, and collate into the batch the HSRM reads."""
    from mmel.hsrm.feature_rows import _Pairs, collate_features

    def compute(batch):
        out = []
        for it in batch:
            if it["n"] == 2:  # an unreadable image
                out.append(None)
                continue
            g = torch.Generator().manual_seed(it["n"])
            k0 = 3  # the image's samples; sample 1 of image 1 was dropped by the transform
            ok = torch.tensor([True, it["n"] != 1, True])
            k = int(ok.sum())
            counts = torch.tensor([1 + (j + it["n"]) % 3 for j in range(k)])
            out.append({
                "evidence": torch.randn(k, 4, 2, 3, generator=g), "text": torch.randn(k, 5, generator=g),
                "boxes": torch.rand(int(counts.sum()), 4, generator=g) * 32, "box_counts": counts,
                "cosines": torch.randn(4, 21, generator=g), "patch_tokens": torch.randn(6, 8, generator=g).half(),
                "pair_ok": ok, "input_size": torch.tensor([32, 32]),
            })  # fmt: skip
            assert len(ok) == k0
        return out

    feats = FeatureCache(tmp_path / "p", KEY, shard_size=2).build(make_items(4), compute, batch_size=3)
    where = [(row, j) for row in range(4) for j in range(3)]
    pairs = _Pairs(feats, where)
    order = [5, 0, 7, 3, 4, 11, 6, 1, 9, 2, 10, 8]
    items = pairs.__getitems__(order)
    for i, item in zip(order, items, strict=True):
        row, j = where[i]
        if row == 2 or (row == 1 and j == 1):
            assert item is None and pairs[i] is None
            continue
        k = j - int(row == 1 and j > 1)  # index among the image's stored pairs
        counts = feats.tensor(row, "box_counts")
        lo = int(counts[:k].sum())
        assert item["id"] == f"s{row}#{j}"
        assert torch.equal(item["evidence"], feats.tensor(row, "evidence")[k])
        assert torch.equal(item["text"], feats.tensor(row, "text")[k])
        assert torch.equal(item["boxes"], feats.tensor(row, "boxes")[lo : lo + int(counts[k])])
        for name in ("cosines", "patch_tokens"):
            want = feats.tensor(row, name)
            assert item[name].dtype == want.dtype and torch.equal(item[name], want)
        assert item["input_size"].tolist() == [32, 32]
        single = pairs[i]
        assert all(torch.equal(single[n], item[n]) for n in ("evidence", "text", "boxes", "cosines", "patch_tokens"))
    batch = collate_features(items)
    good = [x for x in items if x is not None]
    assert batch["evidence"].shape == (len(good), 4, 2, 3) and batch["patch_tokens"].dtype == torch.float32
    assert batch["sample_id"] == [x["id"] for x in good] and batch["input_size"] == (32, 32)
    plain = collate_features(list(items))  # a plain list of the same items: stacked by the collate itself
    for name in ("evidence", "cosines", "patch_tokens", "text"):
        assert torch.equal(batch[name], torch.stack([x[name] for x in good]).to(batch[name].dtype))
        assert torch.equal(plain[name], batch[name])
    assert pairs.__getitems__([6, 7, 8]) == [None, None, None]
