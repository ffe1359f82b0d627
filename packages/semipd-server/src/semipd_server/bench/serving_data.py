"""Offline half of semipd-bench-serving: the workload going in (arrival times, synthetic or ShareGPT prompts)
and the results coming out (per-request records, per-rate statistics: percentiles, SLO attainment, goodput;
the rate at a target attainment, the comparison table, re-scoring saved runs under other SLOs). The PNG plots
are in `serving_plots`.

Nothing here talks to a server, so all of it is unit-tested without one."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LATENCY_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
ITL_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.8)


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Send times (seconds from the start) of an open-loop arrival process: gaps are gamma-distributed with
    mean 1/request_rate and shape `burstiness` (1.0 = Poisson; < 1 burstier, > 1 smoother; the gaps'
    coefficient of variation is 1/sqrt(burstiness)). The first request goes at t=0; an infinite rate sends
    everything at once."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(request_rate) or num_requests == 0:
        return np.zeros(num_requests)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


# --- workloads ----------------------------------------------------------------------------------------------

# Common English words: each is (nearly always) one token for BPE vocabularies once preceded by a space, so a
# prompt of N words is close to N tokens. The server's usage.prompt_tokens is what gets reported.
WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
    "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
    "company", "system", "program", "question", "work", "government", "number", "night", "point", "home",
    "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book",
    "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend",
    "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name",
    "president", "team", "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others",
    "level", "office", "door", "health", "person", "art", "war", "history", "party", "result", "change",
    "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education", "good",
    "new", "first", "last", "long", "great", "little", "own", "other", "old", "big", "high", "different",
    "small", "large", "next", "early", "young", "important", "few", "public", "bad", "same", "able", "red",
    "blue", "green", "open", "close", "read", "write", "run", "walk", "talk", "make", "take", "give", "find",
    "think", "tell", "become", "leave", "feel", "bring", "begin", "keep", "hold", "turn", "start", "show",
    "hear", "play", "move", "live", "believe", "happen", "stand", "lose", "pay", "meet", "include",
    "continue", "set", "learn", "lead", "understand", "watch", "follow", "stop", "create", "speak", "spend",
    "grow", "offer", "remember", "love", "consider", "appear", "buy", "wait", "serve", "die", "send",
    "expect", "build", "stay", "fall", "cut", "reach", "kill", "remain",
)


@dataclass(slots=True)
class SampleRequest:
    prompt: str
    prompt_len: int  # planned (synthetic) or estimated (ShareGPT) prompt tokens
    output_len: int


def random_words(n: int, rng: np.random.Generator) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n))


def _lognormal(median: int, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(1, np.round(rng.lognormal(math.log(max(1, median)), sigma, n))).astype(int)


def synthetic_requests(kind: str, n: int, input_len: int, output_len: int, range_ratio: float,
                       long_fraction: float, long_input_len: int, long_output_len: int, max_model_len: int,
                       rng: np.random.Generator) -> list[SampleRequest]:
    """fixed: every request input_len/output_len. uniform: each length uniform in len*(1 +- range_ratio).
    longtail: chat (lognormal around input_len/output_len) mixed with a `long_fraction` of summarisation
    requests (prompt uniform in [0.5, 1] * long_input_len, output around long_output_len). Prompts are cut so
    that prompt + output fits max_model_len."""
    for name, v in (("input_len", input_len), ("output_len", output_len), ("long_input_len", long_input_len),
                    ("long_output_len", long_output_len), ("max_model_len", max_model_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    if kind == "fixed":
        ins, outs = np.full(n, input_len), np.full(n, output_len)
    elif kind == "uniform":
        def spread(x: int) -> np.ndarray:
            lo, hi = max(1, int(x * (1 - range_ratio))), max(1, int(x * (1 + range_ratio)))
            return rng.integers(lo, hi + 1, size=n)
        ins, outs = spread(input_len), spread(output_len)
    elif kind == "longtail":
        is_long = rng.random(n) < long_fraction
        ins = np.where(is_long, rng.integers(max(1, long_input_len // 2), long_input_len + 1, size=n),
                       _lognormal(input_len, 0.6, n, rng))
        outs = np.where(is_long, _lognormal(long_output_len, 0.3, n, rng),
                        _lognormal(output_len, 0.6, n, rng))
    else:
        raise ValueError(f"dataset must be fixed, uniform, longtail or sharegpt, got {kind!r}")
    outs = np.minimum(outs, max_model_len - 1)
    ins = np.maximum(1, np.minimum(ins, max_model_len - outs))
    return [SampleRequest(random_words(int(i), rng), int(i), int(o)) for i, o in zip(ins, outs)]


def _token_counter(tokenizer: str | None) -> Any:
    """Token count of a text: exact with a `tokenizers` file (tokenizer.json or a directory holding one),
    else ~4 characters per token."""
    if tokenizer is None:
        return lambda text: max(1, math.ceil(len(text) / 4))
    from tokenizers import Tokenizer

    path = Path(tokenizer)
    tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def load_sharegpt(path: Path, max_model_len: int, tokenizer: str | None = None,
                  fixed_output_len: int | None = None) -> list[SampleRequest]:
    """Every usable pair of a ShareGPT-format JSON file,
    [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}, ...]:
    the first human turn is the prompt, the length of the reply after it the output length. Pairs shorter than
    4 tokens either way, or longer than max_model_len together, are dropped."""
    if not path.is_file():
        raise ValueError(f"dataset_path {str(path)!r} is not a file")
    content = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(content, list):
        raise ValueError(f"dataset_path {str(path)!r}: expected a JSON list of conversations")
    count = _token_counter(tokenizer)
    pairs = []
    for entry in content:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not turns or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            continue
        if turns[0].get("from") not in ("human", "user") or turns[1].get("from") not in ("gpt", "assistant"):
            continue
        prompt, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        prompt_len = count(prompt)
        output_len = fixed_output_len or count(reply)
        if prompt_len < 4 or output_len < 4 or prompt_len + output_len > max_model_len:
            continue
        pairs.append(SampleRequest(prompt, prompt_len, output_len))
    if not pairs:
        raise ValueError(f"dataset_path {str(path)!r}: no usable conversation within "
                         f"max_model_len={max_model_len}")
    return pairs


def sample_requests(pool: Sequence[SampleRequest], n: int, rng: np.random.Generator) -> list[SampleRequest]:
    """`n` requests drawn at random from `pool`, without repetition unless the pool is smaller than `n`."""
    if not pool:
        raise ValueError("pool is empty")
    if len(pool) < n:
        print(f"note: only {len(pool)} usable conversations; sampling {n} with repetition", file=sys.stderr)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=len(pool) < n)]


# --- records and statistics ---------------------------------------------------------------------------------

@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. Times in seconds; `send_time` counts from the start of its rate."""

    ok: bool
    send_time: float
    prompt_tokens: int  # the server's usage.prompt_tokens when it reports it, else the planned length
    output_tokens: int
    ttft: float = math.nan
    e2e: float = math.nan
    itls: list[float] = field(default_factory=list)
    planned_prompt_tokens: int = 0
    planned_output_tokens: int = 0
    error: str = ""
    phase: str = ""  # the workload phase it was sent in (non-stationary workloads)

    @property
    def tpot(self) -> float:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1); NaN if < 2 tokens."""
        if not self.ok or self.output_tokens < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def meets_slo(self, slo_ttft_s: float, slo_tpot_s: float) -> bool:
        """Both SLOs held. A request with one output token has no TPOT, so only its TTFT counts."""
        if not self.ok:
            return False
        tpot = self.tpot
        return self.ttft <= slo_ttft_s and (math.isnan(tpot) or tpot <= slo_tpot_s)

    def to_json(self) -> dict[str, Any]:
        """Compact per-request row for the results file (ITL lists are summarised, not stored)."""
        d = asdict(self)
        del d["itls"]
        d["tpot"] = self.tpot
        return {k: _finite_or_none(v) for k, v in d.items()}


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def distribution(values: Sequence[float] | np.ndarray, percentiles: Iterable[float] = LATENCY_PERCENTILES,
                 scale: float = 1000.0) -> dict[str, float | None]:
    """mean and pNN (linear interpolation between order statistics) of `values` times `scale` (s -> ms); None
    for every entry when there are no values."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    keys = ["mean"] + [f"p{p:g}" for p in percentiles]
    if arr.size == 0:
        return dict.fromkeys(keys, None)
    out: dict[str, float | None] = {"mean": float(arr.mean() * scale)}
    for key, p in zip(keys[1:], percentiles):
        out[key] = float(np.percentile(arr, p) * scale)
    return out


def summarize(records: Sequence[RequestRecord], duration_s: float, slo_ttft_ms: float,
              slo_tpot_ms: float) -> dict[str, Any]:
    """Per-rate summary. Throughputs and goodput are over `duration_s` (first send to last completion);
    failed requests count as missing the SLO: attainment = (requests within both SLOs) / (all sent)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = r.error.split(":", 1)[0] or "unknown"
            errors[key] = errors.get(key, 0) + 1
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors,
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "input_throughput": input_tokens / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": distribution([r.ttft for r in done]),
        "tpot_ms": distribution([r.tpot for r in done]),
        "itl_ms": distribution([x for r in done for x in r.itls], ITL_PERCENTILES),
        "e2e_ms": distribution([r.e2e for r in done]),
        **slo_stats(records, duration_s, slo_ttft_ms, slo_tpot_ms),
    }


def slo_stats(records: Sequence[RequestRecord], duration_s: float, slo_ttft_ms: float,
              slo_tpot_ms: float) -> dict[str, Any]:
    """The SLO part of a summary (one rule for a fresh run and for re-scoring a saved one): attainment =
    (requests within both SLOs, `RequestRecord.meets_slo`) / (all sent); goodput = that count / duration."""
    within = sum(r.meets_slo(slo_ttft_ms / 1000.0, slo_tpot_ms / 1000.0) for r in records)
    return {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
            "slo_attainment": within / len(records) if records else None, "goodput": within / duration_s}


SAVED_SLO_FIELDS = ("ok", "ttft", "e2e", "output_tokens")  # what meets_slo reads of a saved request row


def rescore_run(run: Mapping[str, Any], slo_ttft_ms: float, slo_tpot_ms: float,
                source: str) -> dict[str, Any]:
    """A copy of a saved run (a results file's entry; `source` names the file in errors) whose every rate has
    its SLO attainment and goodput recomputed by `slo_stats` from the stored per-request rows, under new SLOs.
    Raises ValueError naming the file, run label and rate when a rate has no rows or a row lacks a field."""
    label = run.get("label", "?")
    points = []
    for point in run["rates"]:
        where = f"{source}: run {label!r} @ {point.get('request_rate')} req/s"
        rows, summary = point.get("requests"), point.get("summary") or {}
        if not isinstance(rows, list) or "duration_s" not in summary:
            raise ValueError(f"{where}: no saved 'requests' list or summary 'duration_s'; cannot re-score")
        if summary.get("num_requests", len(rows)) != len(rows):
            raise ValueError(f"{where}: {len(rows)} saved requests but the summary counts "
                             f"{summary['num_requests']}; cannot re-score")
        records = []
        for i, row in enumerate(rows):
            missing = [k for k in SAVED_SLO_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{where}: saved request {i} has no {', '.join(missing)} field; re-scoring "
                                 f"needs {', '.join(SAVED_SLO_FIELDS)} in every request")
            ttft, e2e = (math.nan if row[k] is None else float(row[k]) for k in ("ttft", "e2e"))
            records.append(RequestRecord(ok=bool(row["ok"]), send_time=0.0, prompt_tokens=0,
                                         output_tokens=int(row["output_tokens"]), ttft=ttft, e2e=e2e))
        stats = slo_stats(records, float(summary["duration_s"]), slo_ttft_ms, slo_tpot_ms)
        points.append({**point, "summary": {**summary, **stats}})
    return {**run, "rates": points}


def rescored_note(slo_ttft_ms: float, slo_tpot_ms: float) -> str:
    return f"TTFT <= {slo_ttft_ms:g} ms, TPOT <= {slo_tpot_ms:g} ms; re-scored from saved requests"


def rate_at_attainment(rates: Sequence[float], attainments: Sequence[float | None],
                       target: float = 0.9) -> tuple[float | None, str]:
    """The request rate where SLO attainment first falls to `target`, linearly interpolated between the last
    rate at or above it and the first one below. Returns (rate, kind) with kind:
    "interpolated"; "lower_bound" (never fell below: the highest rate tried); "not_reached" (already below at
    the lowest rate, rate None); "no_data"."""
    if len(rates) != len(attainments):
        raise ValueError(f"rates and attainments differ in length: {len(rates)} vs {len(attainments)}")
    points = sorted((r, a) for r, a in zip(rates, attainments) if a is not None)
    if not points:
        return None, "no_data"
    if points[0][1] < target:
        return None, "not_reached"
    for (r0, a0), (r1, a1) in itertools.pairwise(points):
        if a1 < target:
            if math.isinf(r1):
                return r0, "lower_bound"
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "interpolated"
    return points[-1][0], "lower_bound"


def format_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


# --- comparison table ---------------------------------------------------------------------------------------

_TABLE_METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("SLO attainment %", "slo_attainment", None),
    ("goodput req/s", "goodput", None),
    ("request throughput req/s", "request_throughput", None),
    ("output throughput tok/s", "output_throughput", None),
    ("TTFT mean ms", "ttft_ms", "mean"), ("TTFT p50 ms", "ttft_ms", "p50"), ("TTFT p90 ms", "ttft_ms", "p90"),
    ("TTFT p99 ms", "ttft_ms", "p99"),
    ("TPOT mean ms", "tpot_ms", "mean"), ("TPOT p90 ms", "tpot_ms", "p90"), ("TPOT p99 ms", "tpot_ms", "p99"),
    ("ITL p99 ms", "itl_ms", "p99"), ("ITL p99.8 ms", "itl_ms", "p99.8"),
    ("E2E mean ms", "e2e_ms", "mean"),
    ("failed requests", "failed", None),
)


def _metric(summary: Mapping[str, Any], key: str, sub: str | None) -> float | None:
    v = summary.get(key)
    if sub is not None:
        v = v.get(sub) if isinstance(v, Mapping) else None
    if v is not None and key == "slo_attainment":
        v = 100.0 * v
    return v


def comparison_table(runs: Sequence[Mapping[str, Any]], target: float = 0.9,
                     slo_note: str | None = None) -> str:
    """Side-by-side text table: one block per metric, one row per request rate, one column per run label;
    then the rate at `target` attainment per label and its ratio to the first label's. `slo_note` (runs
    re-scored under other SLOs: `rescored_note`) is stated in the SLO blocks' headers."""
    labels = [run["label"] for run in runs]
    by_label = {run["label"]: {float(p["request_rate"]): p["summary"] for p in run["rates"]} for run in runs}
    all_rates = sorted({r for per_rate in by_label.values() for r in per_rate})
    width = max(12, *(len(x) + 2 for x in labels))
    lines = []
    head = f"{'rate req/s':>12}" + "".join(f"{x:>{width}}" for x in labels)
    for title, key, sub in _TABLE_METRICS:
        note = f" ({slo_note})" if slo_note and key in ("slo_attainment", "goodput") else ""
        lines += [f"== {title}{note}", head]
        for rate in all_rates:
            cells = []
            for label in labels:
                s = by_label[label].get(rate)
                v = None if s is None else _metric(s, key, sub)
                cells.append(f"{'-' if v is None else f'{v:.2f}':>{width}}")
            lines.append(f"{format_rate(rate):>12}" + "".join(cells))
    lines.append(f"== request rate at {100 * target:g}% SLO attainment (interpolated"
                 f"{f'; {slo_note}' if slo_note else ''})")
    base = math.nan
    for i, label in enumerate(labels):
        per_rate = by_label[label]
        rates = list(per_rate)
        found, kind = rate_at_attainment(rates, [per_rate[r]["slo_attainment"] for r in rates], target)
        rate = math.nan if found is None else found
        if i == 0:
            base = rate
        if kind == "interpolated":
            text = f"{rate:.3g} req/s"
        elif kind == "lower_bound":
            text = f">= {format_rate(rate)} req/s (never fell below)"
        else:
            text = "below target at every rate" if kind == "not_reached" else "no data"
        comparable = i and rate and base and math.isfinite(rate) and math.isfinite(base)
        ratio = f"  ({rate / base:.2f}x {labels[0]})" if comparable else ""
        lines.append(f"  {label}: {text}{ratio}")
    return "\n".join(lines)
