"""EngineConfig: every engine knob, written once, in a typed tree (model / scheduler / semi-PD / SLO /
parallelism sections), validated once when built. `Engine(...)` keywords are checked against it
(`EngineConfig.from_knobs`) and the server's flags are generated from it (`semipd_server.cli`). `resolved()`
fills what depends on the model (context length, dtype and device defaults, EOS ids, SM shares from the
environment); the core takes only a resolved config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from semipd_runtime.knobs import Knob, knob, knobs_of, validate_knobs
from semipd_runtime.models.loader import LOAD_FORMATS
from semipd_runtime.partition import PARTITIONS
from semipd_runtime.slo_control import SloSettings

DTYPES = ("float32", "bfloat16", "float16")
MODES = ("unified", "semi-pd")
# Semi-PD's own environment variables for the shares (its launch scripts set these)
SHARE_ENV = {"prefill_sm_percent": "SEMI_PD_PREFILL_SM_PERCENTILE",
             "decode_sm_percent": "SEMI_PD_DECODE_SM_PERCENTILE"}


@dataclass(slots=True, kw_only=True)
class ModelOptions:
    model_path: str | None = knob(
        None, "Hugging Face model directory; default: the bundled SmolLM2-135M-Instruct",
        flags=("--model-path", "--model"), group="model")
    tokenizer_path: str | None = knob(None, "directory of tokenizer.json and tokenizer_config.json (default: the "
                                      "model's)", flags=("--tokenizer-path", "--tokenizer"), group="model")
    chat_template: str | None = knob(
        None, "chat template for /v1/chat/completions: a Jinja file, or the template itself (default: the "
        "tokenizer's)", flags=("--chat-template",), group="model")
    seed: int | None = knob(None, "seeds the generator that picks each request's seed when it sends none, so a "
                            "run is reproducible (default: random)", flags=("--seed",), minimum=0,
                            maximum=2**63 - 1, group="model")
    max_model_len: int | None = knob(None, "max tokens per request (prompt+output); default: the model's",
                                     flags=("--context-length", "--max-model-len"), minimum=1,
                                     group="model")
    dtype: str | None = knob(None, "weights/activations dtype (default: bfloat16 on GPU, float32 on CPU)",
                             flags=("--dtype",), choices=DTYPES, group="model")
    load_format: str = knob("auto", "auto: the model directory's safetensors; dummy: random weights at its "
                            "config's shapes (benchmarks)", flags=("--load-format",), choices=LOAD_FORMATS,
                            group="model")
    device: str | None = knob(None, "cuda, cuda:N or cpu (default: cuda when available)",
                              flags=("--device",), group="model")
    eos_token_ids: list[int] = field(default_factory=list)  # resolved from the tokenizer and generation config

    def __post_init__(self) -> None:
        validate_knobs(self)


@dataclass(slots=True, kw_only=True)
class SchedulerOptions:
    max_running_requests: int = knob(64, "requests decoded together",
                                     flags=("--max-running-requests", "--max-num-seqs"), minimum=1, group="sched")
    max_queued_requests: int | None = knob(
        None, "requests allowed to wait beyond the running ones; more get HTTP 429 (default: no limit)",
        flags=("--max-queued-requests",), minimum=0, group="sched")
    chunked_prefill_size: int = knob(
        512, "unified mode: prefill tokens per step (mixed with the decode batch); vLLM's "
        "--max-num-batched-tokens is this (semi-pd's prefill batches: --max-prefill-tokens)",
        flags=("--chunked-prefill-size", "--max-num-batched-tokens"), minimum=1, group="sched")
    max_prefill_tokens: int = knob(8192, "semi-pd: prompt tokens per prefill batch and forward (a longer prompt "
                                   "runs in chunks of it)", flags=("--max-prefill-tokens",), minimum=1, group="sched")
    page_size: int = knob(16, "tokens per KV cache page", flags=("--page-size",), minimum=1, group="sched")
    num_pages: int | None = knob(None, "KV pages (default: from memory)", flags=("--num-pages",), minimum=1,
                                 group="sched")
    mem_fraction_static: float = knob(0.85, "fraction of GPU memory for weights + KV cache",
                                      flags=("--mem-fraction-static", "--gpu-memory-utilization"), minimum=0,
                                      maximum=1, exclusive=True, group="sched")
    cpu_kv_budget_bytes: int = knob(1 << 30, "KV cache bytes on CPU (no GPU)", minimum=1)
    cuda_graph_max_bs: int | None = knob(
        None, "largest decode batch run as a CUDA graph (default: --max-running-requests, at most 256)",
        flags=("--cuda-graph-max-bs",), minimum=1, group="sched")
    disable_cuda_graph: bool = knob(False, "run decode steps eagerly (CUDA)", flags=("--disable-cuda-graph",),
                                    group="sched")
    disable_overlap_schedule: bool = knob(
        False, "resolve each step before scheduling the next (default: schedule step N+1 while N runs on the GPU)",
        flags=("--disable-overlap-schedule",), group="sched")
    enable_radix_cache: bool = knob(
        True, "do not share cached prompt prefixes between requests (radix prefix cache over the KV pages)",
        flags=("--disable-radix-cache",), invert=True, group="sched")
    # per-state timeouts (seconds, None = no limit): an expired request ends with finish_reason "abort"
    queue_timeout_s: float | None = knob(None, "longest wait in the queue", minimum=0, exclusive=True)
    prefill_timeout_s: float | None = knob(None, "longest prefill", minimum=0, exclusive=True)
    decode_timeout_s: float | None = knob(None, "longest decode", minimum=0, exclusive=True)

    def __post_init__(self) -> None:
        validate_knobs(self)

    @property
    def overlap_schedule(self) -> bool:
        return not self.disable_overlap_schedule

    def graph_max_bs(self) -> int:
        """Largest decode batch captured as a CUDA graph (0: none)."""
        if self.disable_cuda_graph:
            return 0
        return self.cuda_graph_max_bs if self.cuda_graph_max_bs is not None else min(self.max_running_requests, 256)


@dataclass(slots=True, kw_only=True)
class SemiPDOptions:
    mode: str = knob("unified", "unified: chunked prefill mixed with decode; semi-pd: separate prefill and decode "
                     "workers", flags=("--mode",), choices=MODES, group="pd")
    sm_partition: str = knob("none", "how semi-pd confines each worker to its share of SMs (semipd-server's default: "
                             "green on a CUDA device, none on CPU)",
                             flags=("--sm-partition",), choices=tuple(PARTITIONS), group="pd")
    prefill_sm_percent: int | None = knob(None, "prefill worker's SM share (semi-pd; default: "
                                          "$SEMI_PD_PREFILL_SM_PERCENTILE, else 50)",
                                          flags=("--prefill-sm-percent",), minimum=1, maximum=100, group="pd")
    decode_sm_percent: int | None = knob(None, "decode worker's SM share (semi-pd; default: "
                                         "$SEMI_PD_DECODE_SM_PERCENTILE, else what prefill leaves; green "
                                         "contexts round decode's SMs up to a multiple of 8 on Hopper, 40 -> 56 "
                                         "of 132, and give prefill the rest)",
                                         flags=("--decode-sm-percent",), minimum=1, maximum=100, group="pd")
    prefill_placement: str = knob("process", "where the prefill worker runs without a forced placement",
                                  choices=("process", "thread"))
    # prefill/decode *instances* (SGLang's PD disaggregation; each instance is itself unified or semi-pd)
    disaggregation_mode: str = knob(
        "null", "null: a whole server; prefill: run prompts and send their KV to a decode instance; decode: take "
        "the KV from a prefill instance and decode (behind smg --pd-disaggregation)",
        flags=("--disaggregation-mode",), choices=("null", "prefill", "decode"), group="pd")
    disaggregation_bootstrap_port: int = knob(
        8998, "prefill: port of its bootstrap server; decode: the default when a request names none",
        flags=("--disaggregation-bootstrap-port",), minimum=0, maximum=65535, group="pd")
    disaggregation_transfer_backend: str = knob("mooncake", "how KV pages move between instances",
                                                flags=("--disaggregation-transfer-backend",),
                                                choices=("mooncake",), group="pd")
    disaggregation_host: str = knob("127.0.0.1", "address the bootstrap server and the transfer engine bind "
                                    "(the server's --host)")
    base_gpu_id: int = knob(0, "first GPU this instance uses (cuda:N when --device is not given)",
                            flags=("--base-gpu-id",), minimum=0, group="model")

    def __post_init__(self) -> None:
        validate_knobs(self)

    def shares(self) -> tuple[int, int]:
        """(prefill %, decode %): the knobs, else Semi-PD's environment variables, else 50 / what prefill leaves."""
        prefill = _percent(self.prefill_sm_percent, "prefill_sm_percent", 50)
        decode = _percent(self.decode_sm_percent, "decode_sm_percent",
                          100 - prefill if self.prefill_sm_percent is not None else 50)
        return prefill, decode


def _percent(value: int | None, name: str, default: int) -> int:
    if value is not None:
        return value
    raw = os.environ.get(SHARE_ENV[name])
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError as e:
        raise ValueError(f"{SHARE_ENV[name]}={raw!r} is not an integer percentage (for {name})") from e
    if not 1 <= v <= 100:
        raise ValueError(f"{SHARE_ENV[name]}={v} must be in [1, 100] (for {name})")
    return v


@dataclass(slots=True, kw_only=True)
class ParallelOptions:
    tp_size: int = knob(1, "tensor-parallel ranks: one process per rank (GPU), the model's heads, MLP and "
                        "vocabulary split across them (the engine core process is rank 0)",
                        flags=("--tp-size", "--tp", "--tensor-parallel-size"),
                        minimum=1, group="parallel")
    tp_timeout_s: float = knob(60.0, "longest wait of a rank in a collective before the engine fails",
                               minimum=0, exclusive=True)

    def __post_init__(self) -> None:
        validate_knobs(self)


SECTIONS = {"model": ModelOptions, "scheduler": SchedulerOptions, "semi_pd": SemiPDOptions,
            "slo": SloSettings, "parallel": ParallelOptions}


@dataclass(slots=True, kw_only=True)
class EngineConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    semi_pd: SemiPDOptions = field(default_factory=SemiPDOptions)
    slo: SloSettings = field(default_factory=SloSettings)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    core: str = "thread"  # where the engine core runs next to the front end: "thread" | "process"

    def __post_init__(self) -> None:
        if self.core not in ("thread", "process"):
            raise ValueError(f"core must be 'thread' or 'process', got {self.core!r}")
        if self.slo.partition_policy == "slo" and self.semi_pd.mode != "semi-pd":
            raise ValueError("partition_policy='slo' needs mode='semi-pd' (unified mode has no SM split)")
        if self.parallel.tp_size > 1 and self.semi_pd.disaggregation_mode != "null":
            raise ValueError("tp_size > 1 with disaggregation_mode prefill / decode is not supported yet")
        if self.parallel.tp_size > 1 and self.slo.partition_policy == "slo":
            raise ValueError("partition_policy='slo' with tp_size > 1 is not supported yet (the split is "
                             "static)")

    @classmethod
    def from_knobs(cls, *, core: str = "thread", slo_options: Mapping[str, Any] | None = None,
                   **knobs: Any) -> EngineConfig:
        """A config from flat knob names (`Engine(...)` keywords, e.g. max_running_requests=8); `slo_options`
        sets further SloSettings fields by name. Unknown names raise TypeError listing the known ones."""
        by_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        owner = knob_owners()
        extra = dict(slo_options or {})
        unknown = sorted(n for n in extra if owner.get(n) != "slo")
        if unknown:
            known = sorted(n for n, section in owner.items() if section == "slo")
            raise ValueError(f"slo_options: unknown option(s) {unknown}; known: {known}")
        for name, value in {**extra, **knobs}.items():
            section = owner.get(name)
            if section is None:
                raise TypeError(f"unknown engine option {name!r}; known: {', '.join(sorted(owner))}")
            by_section[section][name] = value
        return cls(core=core, **{name: SECTIONS[name](**kw) for name, kw in by_section.items()})

    def resolved(self, *, max_position_embeddings: int, eos_token_ids: list[int], model_path: str,
                 cuda_available: bool) -> EngineConfig:
        """A copy with every model-dependent default filled in (what the core runs with)."""
        m = self.model
        gpu = f"cuda:{self.semi_pd.base_gpu_id}" if self.semi_pd.base_gpu_id else "cuda"
        device = m.device or (gpu if cuda_available else "cpu")
        model = dataclasses.replace(
            m, model_path=model_path, device=device,
            dtype=m.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
            max_model_len=min(m.max_model_len or max_position_embeddings, max_position_embeddings),
            eos_token_ids=sorted(set(eos_token_ids)))
        prefill, decode = self.semi_pd.shares()
        semi_pd = dataclasses.replace(self.semi_pd, prefill_sm_percent=prefill, decode_sm_percent=decode)
        return dataclasses.replace(self, model=model, semi_pd=semi_pd)

    # --- resolved values (the core's view) --------------------------------------------------------------------
    @property
    def model_path(self) -> str:
        return _set(self.model.model_path, "model_path")

    @property
    def device(self) -> str:
        return _set(self.model.device, "device")

    @property
    def dtype(self) -> str:
        return _set(self.model.dtype, "dtype")

    @property
    def max_model_len(self) -> int:
        return _set(self.model.max_model_len, "max_model_len")

    @property
    def shares(self) -> tuple[int, int]:
        """(prefill %, decode %) of the SMs (from the environment / defaults where not set)."""
        return self.semi_pd.shares()

    @property
    def slo_policy(self) -> SloSettings | None:
        """The SLO settings when the slo policy is on (None: a static split)."""
        return self.slo if self.slo.partition_policy == "slo" else None


def _set(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"{name} is not resolved: build the core from EngineConfig.resolved(...)")
    return value


def knob_owners() -> dict[str, str]:
    """Knob name -> the section that owns it (names are unique across sections)."""
    owners: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"knob {f.name} is in two sections"
            owners[f.name] = section
    return owners


@dataclass(frozen=True, slots=True)
class CliKnob:
    name: str  # the knob (Engine keyword)
    knob: Knob
    default: Any
    value_type: str  # "int" | "float" | "str" | "bool"


def cli_knobs() -> list[CliKnob]:
    """Every knob with a CLI flag, in declaration order."""
    out = []
    for cls in SECTIONS.values():
        types = {f.name: str(f.type).split("|")[0].strip() for f in dataclasses.fields(cls)}
        out += [CliKnob(name, k, default, types[name]) for name, k, default in knobs_of(cls) if k.flags]
    return out
