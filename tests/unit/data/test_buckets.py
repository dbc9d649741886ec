"""Buckets: assignment as a pure function, and a mixed dataset end to end."""

import json
from pathlib import Path

import pytest

from cogtune.cache.reader import Cache
from cogtune.config import make_config
from cogtune.data.buckets import assign_bucket, configured_buckets
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.train.data import epoch_batches

from clips import write_clip
from conftest import cache_path_of, cogtune_here, write_config

BUCKETS = [(9, 32, 48), (9, 48, 32), (9, 32, 32), (5, 32, 48), (5, 48, 32)]


@pytest.mark.parametrize("frames, height, width, expected", [
    (100, 1080, 1920, (9, 32, 48)),  # landscape 16:9 -> the 3:2 bucket
    (100, 1920, 1080, (9, 48, 32)),  # portrait
    (100, 500, 520, (9, 32, 32)),  # nearly square
    (6, 720, 1280, (5, 32, 48)),  # too short for 9 frames: the longest it can fill
    (6, 500, 500, (5, 32, 48)),  # no 5-frame square bucket: equally near 3:2 and 2:3, the first wins
    (4, 720, 1280, None),  # fills no bucket
])
def test_clip_goes_to_nearest_aspect_then_area_then_longest(frames, height, width, expected):
    assert assign_bucket(BUCKETS, frames, height, width) == expected


def test_area_decides_between_buckets_of_one_aspect():
    buckets = [(9, 32, 48), (9, 64, 96), (9, 128, 192)]
    assert assign_bucket(buckets, 9, 60, 90) == (9, 64, 96)
    assert assign_bucket(buckets, 9, 1080, 1620) == (9, 128, 192)


def test_bucket_flags_make_a_grid_or_an_explicit_list():
    values = dict(pretrained_model_name_or_path="m", height_buckets=[32, 48], width_buckets=[48],
                  frame_buckets=[9, 5])
    assert configured_buckets(make_config("preprocess", values)) == [(5, 32, 48), (5, 48, 48), (9, 32, 48),
                                                                     (9, 48, 48)]
    explicit = make_config("preprocess", dict(pretrained_model_name_or_path="m", buckets=["49x480x720", "49x720x480"]))
    assert configured_buckets(explicit) == [(49, 480, 720), (49, 720, 480)]
    assert configured_buckets(make_config("preprocess", dict(pretrained_model_name_or_path="m"))) is None
    with pytest.raises(CogtuneError, match="FRAMESx"):
        make_config("preprocess", dict(pretrained_model_name_or_path="m", buckets=["49-480"]))
    cogvideox = ModelConfigs.load("THUDM/CogVideoX-2b").spec()  # the model's rules, from its shipped configs
    for bad, message in ((["48x480x720"], "4k\\+1"), (["49x480x700"], "width 700 is not a multiple of 16")):
        config = make_config("preprocess", dict(pretrained_model_name_or_path="m", buckets=bad))
        with pytest.raises(CogtuneError, match=message):
            cogvideox.check_clip_settings(config, configured_buckets(config))


def test_batches_come_from_one_bucket_and_mix_buckets_across_the_epoch():
    shapes = [BUCKETS[i % 3] for i in range(30)]
    batches = epoch_batches(shapes, 4, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(30))  # nothing dropped
    assert all(len({shapes[i] for i in b}) == 1 for b in batches)
    assert len({shapes[b[0]] for b in batches[:3]}) > 1  # buckets interleave, not one after another
    assert epoch_batches(shapes, 4, seed=3, epoch=0) == batches
