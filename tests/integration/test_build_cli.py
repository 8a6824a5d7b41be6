"""build-models from the command line on a tiny BERT: gates, Ctrl-C, list and report."""

from pathlib import Path

import yaml

from build_models import steps
from build_models.cli import main
from service.manifest import load_verified

FAST_EVAL = {"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1, "threads": 2}


def recipe_file(tmp_path: Path, source: Path, variants: list, gates: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"family": "tiny", "source": {"path": str(source)}, "task": "embedding",
                                    "max_seq_len": 64, "evaluation": FAST_EVAL, "gates": gates,
                                    "variants": variants}))
    return path


def store_contents(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")) if store.exists() else []


VARIANTS = [
    {"name": "t-fp32", "steps": [{"export_onnx": {}}]},
    {"name": "t-int8", "steps": [{"export_onnx": {}}, {"quantize": {"method": "int8_dynamic"}}]},
]


def test_failed_gate_blocks_publishing_unless_allowed(tmp_path, tiny_embedding_dir, capsys):
    # An exact-match cosine gate: the fp32 graph passes it, the int8 one cannot.
    recipe = recipe_file(tmp_path, tiny_embedding_dir, VARIANTS,
                         {"downstream_retention": None, "mean_cosine": None, "min_cosine": 0.99999})
    store = tmp_path / "store"
    assert main(["build", str(recipe), "--store", str(store)]) == 1
    err = capsys.readouterr().err
    assert "not published: t-int8: gate min_cosine:" in err and "< 0.99999" in err
    assert "--allow-below-gate" in err
    assert [p for p in store_contents(store) if p.startswith("t-int8")] == []
    assert load_verified(store / "t-fp32" / "1").quality.gates[0].passed is True

    assert main(["build", str(recipe), "--store", str(store), "--allow-below-gate", "--variant", "t-int8"]) == 0
    manifest = load_verified(store / "t-int8" / "1")
    gate = manifest.quality.gates[0]
    assert gate.metric == "min_cosine" and gate.passed is False and gate.value < gate.limit


def test_ctrl_c_mid_build_leaves_store_unchanged(tmp_path, tiny_embedding_dir, capsys, monkeypatch):
    recipe = recipe_file(tmp_path, tiny_embedding_dir, VARIANTS, {"downstream_retention": None, "mean_cosine": None})
    store = tmp_path / "store"
    assert main(["build", str(recipe), "--store", str(store), "--variant", "t-fp32"]) == 0
    before = store_contents(store)

    def interrupted(*_args):
        raise KeyboardInterrupt

    # The second variant is interrupted after the first one was built and staged.
    monkeypatch.setitem(steps.STEPS, "quantize", interrupted)
    assert main(["build", str(recipe), "--store", str(store)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted") and "store is unchanged" in err[-1]
    assert store_contents(store) == before


def test_unknown_variant_is_named(tmp_path, tiny_embedding_dir, capsys):
    recipe = recipe_file(tmp_path, tiny_embedding_dir, VARIANTS, {})
    assert main(["build", str(recipe), "--store", str(tmp_path / "s"), "--variant", "nope"]) == 2
    assert "no variant named nope" in capsys.readouterr().err


def test_list_and_report(tmp_path, tiny_embedding_dir, capsys):
    recipe = recipe_file(tmp_path, tiny_embedding_dir, VARIANTS, {"downstream_retention": None, "mean_cosine": None})
    store = tmp_path / "store"
    assert main(["build", str(recipe), "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["list", "--store", str(store), "--verify"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["name", "ver", "format", "precision"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert set(rows) == {"t-fp32", "t-int8"}
    assert rows["t-int8"][3] == "int8" and rows["t-int8"][-1] == "verified"

    (store / "t-int8" / "1" / "model.onnx").write_bytes(b"tampered")
    assert main(["list", "--store", str(store), "--verify"]) == 0
    assert "BROKEN" in capsys.readouterr().out

    out = tmp_path / "reports"
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    family = yaml.safe_load(recipe.read_text())["family"]
    assert "t-fp32" in report and f"{family}-variants.png" in report
    png = (out / f"{family}-variants.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
