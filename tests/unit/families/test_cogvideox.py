"""The CogVideoX family's own rules, from its published config files."""

import pytest


def published_spec(name: str):
    from cogtune.families import PUBLISHED_DIR, ModelConfigs

    return ModelConfigs.load(str(PUBLISHED_DIR / name)).spec()


def test_clip_sizes_a_family_cannot_take_are_refused_before_encoding():
    from cogtune.errors import CogtuneError

    fifteen = published_spec("cogvideox1.5-5b")  # RoPE "slice" grid: up to sample_height/width (300) x 8 pixels
    fifteen.check_clip_size(81, 768, 1360, False)
    fifteen.check_clip_size(49, 2400, 2400, False)
    with pytest.raises(CogtuneError, match="at most 2400x2400 pixels"):
        fifteen.check_clip_size(81, 2416, 1360, False)
    learned = published_spec("cogvideox-5b-i2v")  # learned positional embeddings: 49x480x720 only
    learned.check_clip_size(49, 480, 720, False)
    with pytest.raises(CogtuneError, match="learned positional embeddings for 49 frames of 480x720 only"):
        learned.check_clip_size(49, 480, 640, False)
    learned.check_clip_size(49, 480, 640, True)  # --ignore_learned_positional_embeddings
    published_spec("cogvideox-2b").check_clip_size(25, 320, 480, False)  # sincos: any size
