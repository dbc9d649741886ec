"""The training log read back after a cut."""

import json
import math

from cogtune.train.log import logged_step


def test_a_log_line_cut_short_counts_as_after_every_step():
    assert logged_step(json.dumps({"step": 3, "loss": 0.5})) == 3
    for broken in ('{"step": 4, "lo', "", "[1, 2]", '{"loss": 1}'):
        assert logged_step(broken) == math.inf
