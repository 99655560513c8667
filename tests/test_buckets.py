"""Aspect-ratio buckets, the no-mixing batch sampler, repeats, caption dropout and tag shuffling."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from klein_lora_studio.trainer.data import buckets as bk
from klein_lora_studio.trainer.data import captions
from PIL import Image


def test_buckets_are_multiples_of_16_near_the_training_area():
    sizes = bk.bucket_sizes(1024)
    assert (1024, 1024) in sizes and (1360, 768) in sizes and (768, 1360) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / 1024**2 - 1) < 0.03
    assert len(set(sizes)) == len(sizes)
    with pytest.raises(ValueError, match="multiple of 16"):
        bk.bucket_sizes(1000)


def test_images_go_to_the_nearest_aspect_bucket():
    b = bk.bucket_sizes(512)
    assert bk.nearest_bucket((1920, 1080), b) == (688, 384)  # 16:9
    assert bk.nearest_bucket((1080, 1920), b) == (384, 688)
    assert bk.nearest_bucket((500, 510), b) == (512, 512)
    assert bk.nearest_bucket((3000, 1000), b) == (720, 368)  # 3:1 beyond the widest: the widest
    assert bk.nearest_bucket((400, 300), b) == (592, 448)  # 4:3
    with pytest.raises(ValueError, match="no area"):
        bk.nearest_bucket((0, 10), b)


def test_resize_to_bucket_keeps_aspect_and_hits_the_size():
    im = Image.new("RGB", (1920, 1080), (10, 20, 30))
    out = bk.resize_to_bucket(im, (688, 384))
    assert out.size == (688, 384)
    small = bk.resize_to_bucket(Image.new("RGB", (100, 60)), (688, 384))
    assert small.size == (688, 384)


def test_assignment_and_histogram():
    b = bk.bucket_sizes(512)
    sizes = [(1920, 1080)] * 5 + [(1000, 1000)] * 3 + [(600, 900)]
    names = [f"{i}.png" for i in range(len(sizes))]
    a = bk.assign_buckets(sizes, b)
    assert a == {(512, 512): [5, 6, 7], (416, 624): [8], (688, 384): [0, 1, 2, 3, 4]}
    text = bk.histogram(a, names)
    lines = text.splitlines()
    assert lines[0] == "3 bucket(s) for 9 image(s):"
    assert "688x384" in lines[1] and "(43:24)" in lines[1] and " 5 " in lines[1]
    assert lines[3].rstrip().endswith("8.png")  # a bucket of one names its image


def test_batches_never_mix_buckets_and_cover_every_repeat():
    a = {(512, 512): list(range(0, 7)), (688, 384): list(range(7, 10)), (384, 688): [10]}
    bucket_of = {i: b for b, idx in a.items() for i in idx}
    s = bk.BucketBatchSampler(a, batch_size=2, seed=3, repeats=2)
    batches = list(s)
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 2 for batch in batches)
    assert Counter(i for batch in batches for i in batch) == Counter({i: 2 for i in range(11)})
    assert len(batches) == 7 + 3 + 1  # ceil(14/2) + ceil(6/2) + ceil(2/2)


def test_sampler_is_seeded_and_reshuffles_each_epoch():
    a = {(512, 512): list(range(20)), (688, 384): list(range(20, 30))}
    first = list(bk.BucketBatchSampler(a, 4, seed=7))
    assert first == list(bk.BucketBatchSampler(a, 4, seed=7))
    assert first != list(bk.BucketBatchSampler(a, 4, seed=8))
    s = bk.BucketBatchSampler(a, 4, seed=7)
    assert list(s) != list(s)  # the second epoch is a different order
    dropped = bk.BucketBatchSampler(a, 4, seed=7, drop_last=True)
    assert all(len(b) == 4 for b in dropped) and len(dropped) == 5 + 2


def test_repeats_per_image():
    assert bk.with_repeats([0, 1], 3) == [0, 0, 0, 1, 1, 1]
    assert bk.with_repeats([0, 1, 2], [1, 0, 2]) == [0, 2, 2]
    with pytest.raises(ValueError):
        bk.with_repeats([0], 0)
    a = {(512, 512): [0, 1, 2]}
    got = Counter(i for b in bk.BucketBatchSampler(a, 2, repeats=[1, 3, 2]) for i in b)
    assert got == Counter({0: 1, 1: 3, 2: 2})


def test_tag_shuffle_keeps_the_trigger_first():
    cap = "a cat, zxq style, red hat, on grass, smiling, at night"
    seen = set()
    for seed in range(30):
        out = captions.shuffle_tags(cap, "zxq", random.Random(seed))
        tags = out.split(", ")
        assert tags[0] == "zxq style"
        assert sorted(tags) == sorted(captions.split_tags(cap))
        seen.add(out)
    assert len(seen) > 10  # it does shuffle
    assert captions.shuffle_tags("red hat, cat", "zxq", random.Random(0)).startswith("zxq, ")  # added when missing
    assert captions.shuffle_tags(cap, "zxq", random.Random(5)) == captions.shuffle_tags(cap, "zxq", random.Random(5))


