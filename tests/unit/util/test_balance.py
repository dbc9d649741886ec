"""Videos balanced among the processes of a preprocess run."""

from cogtune.util.distributed import balance


def test_balance_gives_each_video_to_the_least_loaded_process():
    costs = [5.0, 1.0, 4.0, 2.0, 3.0]
    owner = balance(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == rank) for rank in range(2)]
    assert owner == [0, 0, 1, 0, 1] and loads == [8.0, 7.0]  # 5 -> 0, 4 -> 1, 3 -> 1 (4 < 5), 2 -> 0, 1 -> 0 (a tie)
    assert balance([1.0, 1.0, 1.0], 3) == [0, 1, 2]  # ties go to the lowest rank
    assert balance([], 4) == []
