"""Online step-latency models for the SLO partitioner (pure Python + numpy; imports nothing else from semipd).

A step's time is modelled as `t = phi . alpha + h(share) * (phi . beta)` with work features `phi`, SM share
`share` in (0, 1], `h(share) = max(0, 1/share - 1/knee)` and `alpha, beta >= 0`:
- prefill `phi = [steps, tokens, sum n_i * (cached_i + (n_i + 1) / 2)]` (per-step overhead, linear layers, causal
  attention over the cached prefix plus the new tokens);
- decode `phi = [steps, batch, context tokens]` (per-step overhead incl. reading weights, per-sequence work, KV reads).
With knee = 1 this is `alpha + beta * (1/share - 1)`: compute-bound work scales as 1/share. A knee below 1 lets the
fit say "more SMs stop helping past this share", which is how memory-bound decode saturates (bandwidth is reached
with a fraction of the SMs). The knee is picked from a grid by least squares; coefficients are non-negative
(NNLS) so a prediction never falls when work grows or when the share shrinks.

Samples are kept in a sliding window per SM share (with an optional forgetting factor inside each window): online,
most steps run at the current split, and a single global window would forget every other share and leave the share
dependence unidentified. Errors are relative (rows divided by the measured time) so 2 ms decode steps count as much
as 500 ms prefills.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

DEFAULT_KNEES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
PROFILE_VERSION = 1
_MIN_SECONDS = 1e-7  # predictions are clamped here: a step never takes zero time


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (columns rescaled for conditioning, then solved on the normal equations)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.shape != (a.shape[0],):
        raise ValueError(f"nnls needs a 2-D a and b of len a.shape[0], got a {a.shape}, b {b.shape}")
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale  # positive column scaling keeps the constraint x >= 0 unchanged
    return nnls_gram(a.T @ a, a.T @ b) / scale


def nnls_gram(gram: np.ndarray, atb: np.ndarray) -> np.ndarray:
    """Lawson-Hanson active-set NNLS given only A'A and A'b (a few features: cheap whatever the sample count)."""
    n = gram.shape[0]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(np.diag(gram)).max()))

    def solve(mask: np.ndarray) -> np.ndarray:
        z = np.zeros(n)
        sub = gram[np.ix_(mask, mask)]
        try:
            z[mask] = np.linalg.solve(sub, atb[mask])
        except np.linalg.LinAlgError:  # collinear features (e.g. one SM share seen): take the min-norm answer
            z[mask] = np.linalg.lstsq(sub, atb[mask], rcond=1e-13)[0]
        return z

    for _ in range(3 * n + 10):
        w = atb - gram @ x
        w[passive] = -np.inf
        j = int(np.argmax(w))
        if w[j] <= tol:
            break
        passive[j] = True
        z = solve(passive)
        for _ in range(3 * n + 10):
            if (z[passive] > 0).all():
                break
            # step back towards z only as far as feasibility allows; drop the variables that reach zero
            blocking = passive & (z <= 0)
            step = x[blocking] / np.maximum(x[blocking] - z[blocking], 1e-300)
            x = x + float(step.min()) * (z - x)
            passive &= x > tol * 1e-3
            x[~passive] = 0.0
            z = solve(passive)
        x = np.maximum(z, 0.0)
    return x


@dataclass(frozen=True, slots=True)
class PrefillSample:
    """One measured prefill step: per-request new tokens and cached-prefix tokens, SM share, wall seconds."""

    new_tokens: tuple[int, ...]
    cached_tokens: tuple[int, ...]
    sm_share: float
    seconds: float


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """One measured decode step: batch size, total context tokens over the batch, SM share, wall seconds."""

    batch: int
    context_tokens: int
    sm_share: float
    seconds: float


def check_share(sm_share: float, name: str = "sm_share") -> float:
    share = float(sm_share)
    if not (0.0 < share <= 1.0) or math.isnan(share):
        raise ValueError(f"{name} must be a fraction of the GPU's SMs in (0, 1], got {sm_share!r}")
    return share


def check_seconds(seconds: float) -> float:
    s = float(seconds)
    if not (s > 0.0 and math.isfinite(s)):
        raise ValueError(f"seconds must be a finite step time > 0, got {seconds!r}")
    return s


def _token_tuple(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    items = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int or a sequence of them, got {value!r}")
    return tuple(int(v) for v in items)


def prefill_sample(new_tokens: int | Sequence[int], cached_tokens: int | Sequence[int], sm_share: float,
                   seconds: float) -> PrefillSample:
    """Validate one prefill step; a scalar `cached_tokens` applies to every request of the step."""
    new = _token_tuple(new_tokens, "new_tokens")
    if not new or sum(new) == 0:
        raise ValueError(f"new_tokens must hold at least one token, got {new_tokens!r}")
    cached = _token_tuple(cached_tokens, "cached_tokens")
    if len(cached) == 1 and len(new) > 1:
        cached = cached * len(new)
    if len(cached) != len(new):
        raise ValueError(f"cached_tokens must be one int or one per request ({len(new)}), got {cached_tokens!r}")
    return PrefillSample(new, cached, check_share(sm_share), check_seconds(seconds))


def decode_sample(batch: int, context_tokens: int, sm_share: float, seconds: float) -> DecodeSample:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be an int >= 1 (sequences in the decode step), got {batch!r}")
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, (int, np.integer)) or context_tokens < 0:
        raise ValueError(f"context_tokens must be an int >= 0 (sum over the batch), got {context_tokens!r}")
    return DecodeSample(int(batch), int(context_tokens), check_share(sm_share), check_seconds(seconds))


def prefill_features(new_tokens: Sequence[int], cached_tokens: Sequence[int], steps: float = 1.0) -> np.ndarray:
    """[steps, tokens, causal attention work] for requests prefilling `new_tokens` on top of `cached_tokens`."""
    n = np.asarray(new_tokens, dtype=np.float64)
    c = np.asarray(cached_tokens, dtype=np.float64)
    return np.array([steps, n.sum(), float((n * (c + (n + 1) / 2)).sum())])


def decode_features(batch: float, context_tokens: float, steps: float = 1.0) -> np.ndarray:
    return np.array([steps, float(batch), float(context_tokens)])


SampleT = TypeVar("SampleT")  # what a model keeps per sample (PrefillSample / DecodeSample)


class LatencyModel(Generic[SampleT]):
    """t = phi . alpha + h(share) * phi . beta, fitted from samples kept per share (see the module docstring)."""

    def __init__(self, num_features: int, *, window: int = 256, forgetting: float = 0.99,
                 knees: Sequence[float] = DEFAULT_KNEES) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2 (samples kept per SM share), got {window!r}")
        if not 0.0 < float(forgetting) <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
        if not knees:
            raise ValueError("knees must not be empty")
        self.knees = tuple(check_share(k, "knees") for k in knees)
        self.num_features = num_features
        self.window = window
        self.forgetting = float(forgetting)
        self._buckets: dict[float, deque[tuple[np.ndarray, float, SampleT]]] = {}
        self._stats: dict[float, tuple[np.ndarray, np.ndarray, float]] = {}
        self._exact_share: dict[float, float] = {}
        self._dirty = True
        self.knee = 1.0
        self.alpha = np.zeros(num_features)
        self.beta = np.zeros(num_features)
        self.rms_relative_error = math.nan

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    @property
    def shares(self) -> tuple[float, ...]:
        """The distinct SM shares with samples; the share dependence is only identified with two or more."""
        return tuple(sorted(s for s, b in self._buckets.items() if b))

    def samples(self) -> list[SampleT]:
        return [raw for share in self.shares for _, _, raw in self._buckets[share]]

    def _add(self, phi: np.ndarray, share: float, seconds: float, raw: SampleT) -> None:
        key = round(share, 4)  # shares from one SM count must land in one window despite float noise
        self._exact_share.setdefault(key, share)  # ...but the fit uses the share itself
        bucket = self._buckets.setdefault(key, deque(maxlen=self.window))
        bucket.append((phi, seconds, raw))
        self._stats.pop(key, None)
        self._dirty = True

    def _bucket_stats(self, share: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Weighted sufficient statistics of one share's window: (sum w phi phi' / t^2, sum w phi / t, sum w).
        h(share) is constant inside a bucket, so every knee's normal equations are built from these."""
        stats = self._stats.get(share)
        if stats is None:
            bucket = self._buckets[share]
            phi = np.array([row[0] for row in bucket])
            t = np.array([row[1] for row in bucket])
            w = self.forgetting ** np.arange(len(bucket) - 1, -1, -1, dtype=np.float64)  # newest weighs 1
            stats = ((phi * (w / t**2)[:, None]).T @ phi, phi.T @ (w / t), float(w.sum()))
            self._stats[share] = stats
        return stats

    def fit(self) -> None:
        """Refit now (predict() refits lazily when new samples arrived). Minimizes the weighted squared relative
        error sum w (t_pred - t)^2 / t^2 over the knee grid, with alpha, beta >= 0."""
        self._dirty = False
        if not self._buckets:
            return
        nf = self.num_features
        shares = list(self._buckets)
        stats = [self._bucket_stats(share) for share in shares]
        inv_share = 1.0 / np.asarray([self._exact_share[k] for k in shares])
        s_phi = np.stack([st[0] for st in stats])  # [bucket, nf, nf]
        c_phi = np.stack([st[1] for st in stats])  # [bucket, nf]
        total_w = sum(st[2] for st in stats)
        best: tuple[float, float, np.ndarray] | None = None
        for knee in self.knees:
            h = np.maximum(0.0, inv_share - 1.0 / knee)
            cross = np.einsum("b,bij->ij", h, s_phi)
            gram = np.block([[s_phi.sum(0), cross], [cross.T, np.einsum("b,bij->ij", h * h, s_phi)]])
            atb = np.concatenate([c_phi.sum(0), h @ c_phi])
            col_scale = np.sqrt(np.diag(gram))  # features span 1 .. 1e9: scale for conditioning
            col_scale[col_scale == 0] = 1.0
            coef = nnls_gram(gram / np.outer(col_scale, col_scale), atb / col_scale) / col_scale
            sse = max(0.0, total_w - 2 * float(atb @ coef) + float(coef @ gram @ coef))
            if best is None or sse < best[0] * (1 - 1e-9) - 1e-15:  # ties keep the earlier (larger) knee
                best = (sse, knee, coef)
        assert best is not None
        sse, self.knee, coef = best
        self.alpha, self.beta = coef[:nf], coef[nf:]
        self.rms_relative_error = math.sqrt(sse / max(total_w, 1e-12))

    def predict_features(self, phi: np.ndarray, sm_share: float) -> float:
        """Predicted seconds for work `phi` at `sm_share` (phi may cover several steps: phi[0] = step count)."""
        share = check_share(sm_share)
        if self._dirty:
            self.fit()
        h = max(0.0, 1.0 / share - 1.0 / self.knee)
        return max(_MIN_SECONDS, float(phi @ self.alpha + h * (phi @ self.beta)))


class PrefillLatencyModel(LatencyModel[PrefillSample]):
    def __init__(self, *, window: int = 256, forgetting: float = 0.99,
                 knees: Sequence[float] = DEFAULT_KNEES) -> None:
        super().__init__(3, window=window, forgetting=forgetting, knees=knees)

    def observe(self, new_tokens: int | Sequence[int], cached_tokens: int | Sequence[int], sm_share: float,
                seconds: float) -> None:
        self.add_sample(prefill_sample(new_tokens, cached_tokens, sm_share, seconds))

    def add_sample(self, s: PrefillSample) -> None:
        self._add(prefill_features(s.new_tokens, s.cached_tokens), s.sm_share, s.seconds, s)

    def predict(self, new_tokens: int | Sequence[int], cached_tokens: int | Sequence[int], sm_share: float) -> float:
        s = prefill_sample(new_tokens, cached_tokens, sm_share, 1.0)
        return self.predict_features(prefill_features(s.new_tokens, s.cached_tokens), s.sm_share)


class DecodeLatencyModel(LatencyModel[DecodeSample]):
    def __init__(self, *, window: int = 256, forgetting: float = 0.99,
                 knees: Sequence[float] = DEFAULT_KNEES) -> None:
        super().__init__(3, window=window, forgetting=forgetting, knees=knees)

    def observe(self, batch: int, context_tokens: int, sm_share: float, seconds: float) -> None:
        self.add_sample(decode_sample(batch, context_tokens, sm_share, seconds))

    def add_sample(self, s: DecodeSample) -> None:
        self._add(decode_features(s.batch, s.context_tokens), s.sm_share, s.seconds, s)

    def predict(self, batch: int, context_tokens: int, sm_share: float) -> float:
        s = decode_sample(batch, context_tokens, sm_share, 1.0)
        return self.predict_features(decode_features(s.batch, s.context_tokens), s.sm_share)


@dataclass(slots=True)
class LatencyProfile:
    """Measured steps (e.g. a startup profiling pass) that seed the models; saved as JSON per model + GPU key."""

    key: dict[str, str] = field(default_factory=dict)
    prefill: list[PrefillSample] = field(default_factory=list)
    decode: list[DecodeSample] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "version": PROFILE_VERSION,
            "key": dict(self.key),
            "prefill": [{"new_tokens": list(s.new_tokens), "cached_tokens": list(s.cached_tokens),
                         "sm_share": s.sm_share, "seconds": s.seconds} for s in self.prefill],
            "decode": [{"batch": s.batch, "context_tokens": s.context_tokens, "sm_share": s.sm_share,
                        "seconds": s.seconds} for s in self.decode],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyProfile:  # parsed JSON: checked here, field by field
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile: expected a JSON object with version {PROFILE_VERSION}")
        try:
            return cls(
                key={str(k): str(v) for k, v in dict(data.get("key", {})).items()},
                prefill=[prefill_sample(d["new_tokens"], d["cached_tokens"], d["sm_share"], d["seconds"])
                         for d in data.get("prefill", [])],
                decode=[decode_sample(d["batch"], d["context_tokens"], d["sm_share"], d["seconds"])
                        for d in data.get("decode", [])],
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"profile: malformed sample ({e!r})") from e

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], expect_key: dict[str, str] | None = None) -> LatencyProfile:
        """Read a saved profile; `expect_key` (e.g. {"model": ..., "gpu": ...}) must match the stored key."""
        profile = cls.from_json(json.loads(Path(path).read_text()))
        if expect_key is not None and profile.key != {str(k): str(v) for k, v in expect_key.items()}:
            raise ValueError(f"profile {path} was measured for {profile.key}, not {expect_key}")
        return profile


def profile_cache_path(cache_dir: str | os.PathLike[str], model: str, gpu: str) -> Path:
    """`<cache_dir>/slo_profile--<model>--<gpu>.json` with unsafe characters replaced."""
    def safe(s: str) -> str:
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s) or "_"

    if not model or not gpu:
        raise ValueError(f"model and gpu must be non-empty, got model={model!r}, gpu={gpu!r}")
    return Path(cache_dir) / f"slo_profile--{safe(model)}--{safe(gpu)}.json"
