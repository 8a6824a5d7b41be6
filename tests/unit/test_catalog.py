"""The report: the Pareto front of speed and quality, and the per-variant table of embedding types."""

from build_models.catalog import embedding_types_markdown, pareto_front
from service.manifest import EmbeddingTypesQuality
from tests.helpers import make_variant


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



def test_report_shows_each_embedding_variants_type_table(tmp_path):
    table = EmbeddingTypesQuality(k=10, rescore_candidates=40, queries=400, corpus=1200, similarity={}, rows=[
        {"type": "float32", "bytes_per_vector": 32, "probe_accuracy": 0.9, "probe_retention": 1.0, "recall_at_k": 0.99},
        {"type": "binary", "bytes_per_vector": 1, "probe_accuracy": 0.8, "probe_retention": 0.8889,
         "recall_at_k": 0.5, "recall_at_k_rescored": 0.85}])
    measured = make_variant(tmp_path / "a").model_copy(update={"name": "a"})
    measured.quality.embedding_types = table
    older = make_variant(tmp_path / "old").model_copy(update={"name": "old"})  # built before the table existed
    text = embedding_types_markdown([measured, older])
    assert "### a v3 (onnx int8)" in text and "### old" not in text
    assert "| binary | 1 | 0.8000 | 0.8889 | 0.5000 | 0.8500 |" in text
    assert "| float32 | 32 | 0.9000 | 1.0000 | 0.9900 | - |" in text
    assert embedding_types_markdown([older]) == ""
