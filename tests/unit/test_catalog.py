"""The report's Pareto front: the variants nothing else beats on both speed and quality."""

from build_models.catalog import pareto_front


def test_pareto_front_keeps_only_undominated_trade_offs():
    points = [(100.0, 1.00),   # slowest, best: on the front
              (200.0, 0.99),   # on the front
              (150.0, 0.98),   # beaten by (200, 0.99) on both axes
              (400.0, 0.97),   # fastest: on the front
              (400.0, 0.95)]   # as fast as the one above, worse: dominated
    assert pareto_front(points) == [0, 1, 3]


def test_pareto_front_of_one_point_and_of_ties():
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([]) == []
