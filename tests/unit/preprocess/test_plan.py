"""The plan of a preprocess run: how many unusable clips stop it."""

import pytest

from cogtune.preprocess.plan import failure_limit


@pytest.mark.parametrize("max_failures, clips, limit", [
    (None, 100, None), (10.0, 100, 10), (1.0, 3, 1), (0.05, 100, 5), (0.05, 19, 0), (0.0, 50, 0), (0.5, 7, 3)])
def test_failure_limit_is_a_count_from_one_up_and_a_fraction_below(max_failures, clips, limit):
    assert failure_limit(max_failures, clips) == limit
