"""Hub ids told from paths, for models and datasets."""

import pytest

from cogtune.data.sources import _looks_like_hub_id
from cogtune.util.hub import looks_like_hub_id


@pytest.mark.parametrize("name, hub", [
    ("THUDM/CogVideoX-2b", True), ("Wild-Heart/Disney-VideoGeneration-Dataset", True), ("gpt2", True),
    ("./data", False), ("/data/clips", False), ("~/clips", False), ("a/b/c", False), ("a//b", False),
    ("my data/x", False), ("", False)])
def test_hub_ids_are_told_from_paths(name, hub):
    assert looks_like_hub_id(name) is hub


def test_a_metadata_file_name_is_not_a_hub_dataset():
    assert _looks_like_hub_id("user/videos") and not _looks_like_hub_id("clips/metadata.csv")
    assert not _looks_like_hub_id("clips/train.jsonl")
