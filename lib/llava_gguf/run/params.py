"""Run parameters: one YAML file per run, validated on load.

The keys are a contract shared with other tools that write params files, so every key is
declared here, unknown keys are refused, and errors name the key and the file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..model.quant_types import MMPROJ_OUTTYPES, QUANTIZE_TYPES, TEXT_OUTTYPES

log = logging.getLogger(__name__)

DEFAULT_PARAMS = "params/default.yaml"


class ParamsError(ValueError):
    """A params file is unreadable or invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModel(_Strict):
    size: Literal["tiny", "7b"] = "tiny"
    format: Literal["safetensors", "bin"] = "safetensors"
    shards: int = Field(2, ge=1)
    seed: int = 0
    layout: Literal["llava", "hf"] = "llava"  # hf: laid out as llava-hf/llava-v1.6-vicuna-7b-hf


class ModelParams(_Strict):
    source: Literal["tiny", "local", "huggingface", "modelscope"] = "tiny"
    repo: str = "liuhaotian/llava-v1.6-vicuna-7b"
    revision: str | None = None
    path: str | None = None
    format: Literal["checkpoint", "gguf"] = "checkpoint"
    # For format=gguf: file names inside the repo (or path) of the ready text model and mmproj.
    text_file: str | None = None
    mmproj_file: str | None = None
    # Glob patterns restricting what is downloaded (hub sources); None means everything.
    allow_patterns: list[str] | None = None
    tiny: TinyModel = TinyModel()


class LlamaCppParams(_Strict):
    # A directory holding an existing llama.cpp build (its bin/ or the folder with the tools).
    # The environment variable LLAMA_CPP_DIR takes precedence over this key.
    dir: str | None = None


class ConvertParams(_Strict):
    outtype: Literal[TEXT_OUTTYPES] = "f16"
    mmproj_outtype: Literal[MMPROJ_OUTTYPES] = "f16"
    # Compare llama.cpp's outputs with a PyTorch reference (streamed one layer at a time; the 7B's
    # text check holds about one layer in memory beside the page cache).
    verify: bool = True
    verify_prompt: str = "The capital of France is"
    threads: int | None = None
    # The vision tower's CLIPVisionConfig JSON (e.g. the recipe's config_vit.json), absolute or relative
    # to the repo root. None: the vision_config config.json carries, else the known config of the
    # tower mm_vision_tower names when the weights are that tower's (else the run is refused).
    vision_config: str | None = None


class QuantizeParams(_Strict):
    types: list[str] = ["Q5_K_M"]
    imatrix: bool = False
    imatrix_chunks: int = 10
    # Tokens per imatrix chunk (llama-imatrix -c) over the calibration corpus.
    imatrix_ctx: int = Field(512, ge=16)
    threads: int | None = None

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        unknown = [t for t in types if t.upper() not in QUANTIZE_TYPES]
        if unknown:
            raise ValueError(f"unknown quant type(s) {unknown}; known: {', '.join(QUANTIZE_TYPES)}")
        return [t.upper() for t in types]


class EvalCase(_Strict):
    image: str | None = None  # None: tools/mtmd/test-1.jpeg of the llama.cpp source
    prompt: str


class EvaluateParams(_Strict):
    cases: list[EvalCase] = [
        EvalCase(prompt="Describe this image."),
        EvalCase(prompt="What is this picture about?"),
    ]
    n_predict: int = 32
    seed: int = 42
    temperature: float = 0.0
    threads: int | None = None
    threads_batch: int | None = None
    # -C / -Cb (hex CPU masks) and --cpu-strict 0|1: the keys of llama_cpp/flags.py's table.
    cpu_mask: str | None = Field(None, pattern=r"^(0x)?[0-9a-fA-F]+$")
    cpu_mask_batch: str | None = Field(None, pattern=r"^(0x)?[0-9a-fA-F]+$")
    cpu_strict: Literal[0, 1] | None = None
    # With threads_batch given, llama.cpp stops copying cpu_strict to the prompt's thread pool.
    cpu_strict_batch: Literal[0, 1] | None = None
    batch_size: int | None = None
    ubatch_size: int | None = None
    ctx_size: int = 4096
    flash_attn: Literal["on", "off", "auto"] | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    # Passed as --chat-template; GGUFs from the legacy scripts carry none (None: the GGUF's own).
    chat_template: str | None = None
    # Evaluate the unquantized text GGUF too (the quality baseline).
    include_unquantized: bool = True
    perplexity: bool = True
    perplexity_ctx: int = 128
    perplexity_chunks: int = 4
    # KL-divergence budget for the report's "fastest variant within budget" summary.
    kld_budget: float = 0.05
    timeout_s: int = Field(3600, ge=1)
    # A timed run is "under load" when other processes (steal included) kept more than this many
    # cores busy on average during it (lib/llava_gguf/run/machine_load.py); such runs are marked everywhere.
    load_threshold: float = Field(0.25, ge=0)
    # The machine's name in machine.json, the reports and the scripts' headers (never the host name);
    # None: the device tree model or DMI product name, else the CPU model.
    board: str | None = None


class BenchParams(_Strict):
    """`make bench` (params/bench.yaml): conversion costs side by side, then inference speed."""

    # Quant types timed with llama-bench (made from the f16 export; F16 means that file itself).
    # The end-to-end comparison with the legacy recipe uses quantize.types[0].
    quant_types: list[str] = ["Q4_K_M", "Q5_K_M", "Q8_0"]
    # llama-bench thread counts; None: 1, 2, 4, ... up to the usable cores, and the core count itself.
    threads: list[int] | None = None
    repetitions: int = Field(2, ge=1)
    n_prompt: int = Field(512, ge=0)  # pp<n_prompt>
    n_gen: int = Field(128, ge=0)  # tg<n_gen>
    # One llama-mtmd-cli image run per quant type (evaluate.cases[0]; minutes per type on 2 cores).
    mtmd: bool = False
    # llama.cpp's legacy recipe on the same checkpoint (needs a transformers<5 venv, made once).
    legacy: bool = True
    # llama-bench / llama-mtmd-cli after the conversion benchmark.
    inference: bool = True
    # Keep the GGUF files made (the legacy F32 file alone is 27 GB at 7B); tables and logs are always kept.
    keep_outputs: bool = False
    # Per measured step; a step running longer is killed and the benchmark stops.
    timeout_s: int = Field(3 * 3600, ge=1)

    @field_validator("quant_types")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        return QuantizeParams._known_types(types)

    @field_validator("threads")
    @classmethod
    def _positive(cls, threads: list[int] | None) -> list[int] | None:
        if threads is not None and (not threads or min(threads) < 1):
            raise ValueError("list thread counts >= 1, or leave it out (null) for 1, 2, 4, ... up to the cores")
        return threads


class TuneParams(_Strict):
    """`07_tune`: the fastest runtime configuration within a quality budget (see lib/llava_gguf/steps/tune.py)."""

    # Text GGUFs to try; None: this CPU's candidates (quant_candidates: the types its build repacks and the
    # seed's Q5_K_M, at least Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_K_S, IQ4_NL, Q4_0), made from the run's text
    # GGUF where step 05 did not make them (ready-made GGUF files: the downloaded ones).
    quant_types: list[str] | None = None
    # Thread counts (-t and -tb together); None: 1 ... the usable cores (powers of two above 8).
    threads: list[int] | None = None
    flash_attn: list[Literal["on", "off"]] = ["on", "off"]
    # -ub values; null in the list: the tool's default.
    ubatch_size: list[int | None] = [None, 256]
    # KV-cache types, K and V alike (a quantized V cache needs flash attention: those pairs are skipped).
    cache_type: list[Literal["f16", "q8_0", "q4_0", "f32", "bf16"]] = ["f16", "q8_0"]
    mmproj_types: list[Literal["f16", "q8_0"]] = ["f16", "q8_0"]
    # name -> clip.vision.image_grid_pinpoints ([[w, h], ...]); null keeps the mmproj's own (the full
    # budget), [] drops the key: one image_size view (576 tokens for LLaVA 1.6's 336-px tower).
    image_budgets: dict[str, list[list[int]] | None] = {
        "full": None, "wide-tall": [[672, 336], [336, 672]], "single": []}
    repetitions: int = Field(3, ge=1)
    # Finalists confirmed with full runs per image budget (besides the baseline).
    finalists: int = Field(2, ge=1)
    # Wall-clock budget of the screening; the confirmation runs always happen (their estimate is logged).
    budget_minutes: float = Field(30.0, gt=0)
    # Mean KL divergence allowed for a quant type; None: evaluate.kld_budget.
    kld_budget: float | None = None
    # Tokens per screening run (the full runs use evaluate.n_predict).
    screen_n_predict: int = Field(4, ge=2)
    # Greedy answers of every image budget x mmproj type on evaluate.cases, compared with full/f16.
    agreement: bool = True
    # The llama-bench screen of every quant type before any answer is timed (tune_screen.py):
    # pp<bench_prompt> and tg<bench_gen> at the candidate thread counts, bench_repetitions runs each.
    bench_prompt: int = Field(512, ge=1)
    bench_gen: int = Field(128, ge=1)
    bench_repetitions: int = Field(1, ge=1)
    # A type slower at both prefill and generation than one at least as precise, by more than this
    # fraction, is screened out (slower at every image budget).
    screen_margin: float = Field(0.1, ge=0)
    # The published recipe (the seed's command on the unpatched pinned llama.cpp) as a second baseline:
    # build (when absent, once), if-built (only when cached), off ($LLAVA_GGUF_PUBLISHED_BASELINE wins).
    published_baseline: Literal["build", "if-built", "off"] = "build"
    # The low-bit types (4 bits per weight or fewer) also with (or, when quantize.imatrix, without) an
    # importance matrix over the shipped calibration text; the lower KLD decides which file is used.
    imatrix: bool = True
    # Confirmation runs taken under load (evaluate.load_threshold) are run again, at most this many
    # times per configuration; a run still under load after that is kept and marked.
    load_retries: int = Field(2, ge=0)

    @field_validator("quant_types")
    @classmethod
    def _known_types(cls, types: list[str] | None) -> list[str] | None:
        return None if types is None else QuantizeParams._known_types(types)

    @field_validator("threads")
    @classmethod
    def _positive(cls, threads: list[int] | None) -> list[int] | None:
        return BenchParams._positive(threads)

    @field_validator("image_budgets")
    @classmethod
    def _budgets(cls, budgets: dict[str, list[list[int]] | None]) -> dict:
        if not budgets:
            raise ValueError("name at least one image budget, e.g. {full: null}")
        if None not in budgets.values():
            # The seed's command runs at the mmproj's own pinpoints, and every ratio is to it.
            raise ValueError(f"no budget keeps the mmproj's own pinpoints ({sorted(budgets)}): add `full: null`, "
                             "the budget of the seed's command that every speed-up is measured against")
        for name, pins in budgets.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"budget name '{name}': letters, digits, '-' and '_' only (it names files)")
            if pins is not None and any(len(p) != 2 or min(p) < 1 for p in pins):
                raise ValueError(f"budget '{name}': pinpoints are [width, height] pairs of positive pixels")
        return budgets


class PublishParams(_Strict):
    """`make publish`: the model card and, with UPLOAD=1, the hub repository it goes to."""

    # Target repository "owner/name"; the token comes from the environment (HF_TOKEN or
    # MODELSCOPE_API_TOKEN), never from this file.
    repo: str | None = None
    hub: Literal["huggingface", "modelscope"] = "huggingface"
    private: bool = False
    # Variants to publish (e.g. [Q4_K_M, Q8_0], or [all]); None: the evaluation's chosen variant.
    # The mmproj is always included.
    files: list[str] | None = None
    # The card's license; None: the base model's (llama2 for LLaVA 1.6 Vicuna).
    license: str | None = None


class PipelineParams(_Strict):
    """How `make` / `python -m llava_gguf run` execute the step notebooks."""

    # papermill's execution_timeout: a cell running longer is stopped, its kernel and tools killed, and
    # the step fails naming the cell and the limit. Every tool inside has its own limit
    # (llama_cpp/limits.py); this one bounds the Python between them. The longest cells are a 7B
    # download on a slow link and 06 evaluate of five quant types at 7B on a board: hours.
    cell_timeout_s: int = Field(12 * 3600, ge=1)


class Params(_Strict):
    run: str
    model: ModelParams = ModelParams()
    llama_cpp: LlamaCppParams = LlamaCppParams()
    convert: ConvertParams = ConvertParams()
    quantize: QuantizeParams = QuantizeParams()
    evaluate: EvaluateParams = EvaluateParams()
    bench: BenchParams = BenchParams()
    tune: TuneParams = TuneParams()
    publish: PublishParams = PublishParams()
    pipeline: PipelineParams = PipelineParams()

    @field_validator("run")
    @classmethod
    def _plain_name(cls, run: str) -> str:
        if not run or "/" in run or run.startswith(".") or run.strip() != run:
            raise ValueError("must be a plain folder name (no '/', no leading '.')")
        return run

    # Where the file came from; not a key of the file.
    _source_file: Path | None = None

    @property
    def source_file(self) -> Path | None:
        return self._source_file


def _format_errors(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{key}' (remove it or fix its spelling; "
                         "the README lists every key)")
        else:
            got = e.get("input")
            lines.append(f"{where}: key '{key}': {e['msg']} (got {got!r})")
    return "\n".join(lines)


def parse_params(data: object, where: str = "<params>") -> Params:
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, where)) from None


def load_params(path: str | Path) -> Params:
    """Load and validate a params YAML file; errors name the file and the offending key."""
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, not a params file (pass PARAMS=params/<name>.yaml)")
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (pass PARAMS=params/<name>.yaml)")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: is not a text file (byte {err.object[err.start]:#04x} at offset {err.start} "
                          "is not UTF-8); a params file is UTF-8 YAML like params/default.yaml") from None
    except OSError as err:
        raise ParamsError(f"{path}: cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    params = parse_params(data, str(path))
    params._source_file = path.resolve()
    log.info("params: %s (run %s, model source %s)", path, params.run, params.model.source)
    return params
