"""Resolve a recipe's source to a local checkpoint directory and read what the task needs from it.

No network: a source is a local Hugging Face directory or an installed Python package that ships
one (found by its ``get_model_path()`` or a ``model/`` folder inside it).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from build_models.errors import SourceError
from build_models.recipe import SourceConfig

SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")
# Families the ORT transformer optimizer knows by model_type; others are optimized as 'bert'.
ORT_MODEL_TYPE = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "xlm-roberta": "bert",
                  "camembert": "bert", "electra": "bert", "mpnet": "bert"}


@dataclass
class ResolvedSource:
    path: Path
    description: dict
    model_type: str
    config: dict
    pooling: str = "mean"
    normalize: bool = False
    max_seq_len: int = 512
    labels: list[str] | None = None
    # sentence-transformers prompts (config_sentence_transformers.json), recorded in the manifest.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    notes: list[str] = field(default_factory=list)


def _package_dir(name: str) -> Path:
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise SourceError(f"source package {name!r} is not installed (pip install it; no hub download)") from None
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        return Path(getter())
    candidate = Path(module.__file__).parent / "model"
    if candidate.is_dir():
        return candidate
    raise SourceError(f"package {name!r} ships no model directory (no get_model_path() and no model/)")


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: unreadable JSON ({exc})") from None


def _sentence_transformers_pooling(path: Path) -> tuple[str | None, bool]:
    """Pooling mode and normalization from modules.json / 1_Pooling/config.json, if present."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None, False
    modules = _read_json(modules_file)
    pooling, normalize = None, False
    for module in modules if isinstance(modules, list) else []:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg_file = path / module.get("path", "1_Pooling") / "config.json"
            cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif cfg.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def _read_prompts(path: Path, src: ResolvedSource) -> None:
    """The checkpoint's sentence-transformers prompts. The served graph pools over every token, so a
    checkpoint whose pooling leaves the prompt out (include_prompt: false) gets no prompts, with a note."""
    cfg_file = path / "config_sentence_transformers.json"
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    prompts = cfg.get("prompts") if isinstance(cfg, dict) else None
    if not prompts:
        return
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise SourceError(f"{cfg_file}: prompts must map names to texts")
    modules = _read_json(path / "modules.json") if (path / "modules.json").is_file() else []
    for module in modules if isinstance(modules, list) else []:
        pooling_cfg = path / module.get("path", "1_Pooling") / "config.json"
        if module.get("type", "").endswith("Pooling") and pooling_cfg.is_file() and \
                _read_json(pooling_cfg).get("include_prompt") is False:
            src.notes.append("the pooling leaves the prompt's tokens out (include_prompt: false), which the "
                             "served graph cannot: the prompts are not recorded")
            return
    src.prompts = {k: v for k, v in prompts.items() if v}  # an empty prompt is no prompt
    default = cfg.get("default_prompt_name")
    src.default_prompt_name = default if default in src.prompts else None


def checkpoint_config(path: Path) -> dict:
    """config.json of a checkpoint directory of a supported family; the cheap checks, before any import."""
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if not path.is_dir():
        raise SourceError(f"source {path} is not a directory: expected a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SourceError(f"source {path} is not a Hugging Face checkpoint: expected a directory with config.json, "
                          f"the weights and the tokenizer files (as save_pretrained writes them)")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise SourceError(f"{config_file}: expected a JSON object")
    model_type = config.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        shown = repr(model_type) if model_type else "(none in config.json)"
        raise SourceError(
            f"source {path}: model_type {shown} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def classification_head(config: dict) -> str | None:
    """The checkpoint's ``*ForSequenceClassification`` architecture, if it has one."""
    return next((a for a in config.get("architectures") or [] if a.endswith("ForSequenceClassification")), None)


def default_task(config: dict) -> str:
    return "classification" if classification_head(config) else "embedding"


def _check_task(path: Path, config: dict, task: str, labels_from_teacher: bool) -> None:
    """Refuse a task the checkpoint was not trained for. ``labels_from_teacher``: a finetune teacher step
    trains the head, so any encoder will do. A classifier's encoder was tuned to separate its labels, not
    to embed sentences: asking for embeddings from one is far more often a slip than a plan."""
    head = classification_head(config)
    if task == "embedding" and head:
        raise SourceError(f"source {path} is a sequence classifier ({head}), not a sentence-embedding model: "
                          f"use --task classification (task: classification in a recipe)")
    # Without 'architectures' (hand-written configs) the id2label check below is all there is to go on.
    if task == "classification" and not labels_from_teacher and not head and config.get("architectures"):
        raise SourceError(f"source {path} has no sequence-classification head (architectures: "
                          f"{', '.join(config['architectures'])}): task classification needs a "
                          f"*ForSequenceClassification checkpoint with id2label, or a finetune teacher step "
                          f"in a recipe; for sentence embeddings use --task embedding (task: embedding in a recipe)")


def resolve_source(cfg: SourceConfig, task: str, base_dir: Path | None = None,
                   labels_from_teacher: bool = False) -> ResolvedSource:
    """The checkpoint directory and what the task needs from it. ``labels_from_teacher``: a classifier
    recipe whose teacher step (finetune) brings the labels, so the source needs none."""
    if cfg.package:
        path = _package_dir(cfg.package)
        description = {"package": cfg.package}
        try:
            from importlib import metadata

            description["package_version"] = metadata.version(cfg.package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a version is nice to have, never required
            pass
    else:
        path = Path(cfg.path).expanduser()
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        description = {"path": str(path)}
    config = checkpoint_config(path)
    model_type = config["model_type"]
    _check_task(path, config, task, labels_from_teacher)
    has_weights = any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")) or any(
        path.glob("model-*.safetensors")
    )
    if not has_weights:
        raise SourceError(f"source {path} has no weights (model.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise SourceError(f"source {path} has no tokenizer files")

    src = ResolvedSource(path=path, description=description, model_type=model_type, config=config)
    src.max_seq_len = int(config.get("max_position_embeddings", 512))
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        src.max_seq_len -= 2  # positions start after the padding index
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        src.max_seq_len = min(src.max_seq_len, int(_read_json(st_cfg).get("max_seq_length", src.max_seq_len)))

    if task == "embedding":
        pooling, normalize = _sentence_transformers_pooling(path)
        if pooling is None:
            src.notes.append("no sentence-transformers pooling config: using mean pooling, no normalization")
            pooling = "mean"
        src.pooling, src.normalize = pooling, normalize
        _read_prompts(path, src)
    elif labels_from_teacher:
        src.pooling, src.normalize = None, False
    else:
        id2label = config.get("id2label")
        if not id2label:
            raise SourceError(f"source {path}: a classification checkpoint needs id2label in config.json")
        src.labels = [id2label[k] for k in sorted(id2label, key=lambda k: int(k))]
        src.pooling, src.normalize = None, False
    return src
