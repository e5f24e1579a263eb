"""Combine several LoRA adapters into one, in delta space.

Every method works on the TRUE deltas dW_i = s_i * B_i @ A_i (never on A and B separately, which
adds cross terms: PEFT's and LoRAX's non-SVD methods), so ranks may differ, rsLoRA and
rank/alpha patterns are honoured, and the result is factored back to rank R by truncated SVD with
its relative Frobenius error reported per module and overall.

    linear           sum_i w_i dW_i, factored exactly (default rank: the sum of the input ranks)
    svd              the same sum, truncated to R (default: the largest input rank, PEFT's default)
    cat              sum_i w_i dW_i stored as the stacked factors, no SVD: exact, rank = sum of ranks
    ties, dare_linear, dare_ties, magnitude_prune
                     the operators of lorad.deltas.methods on tau_i = w_i dW_i, then truncated SVD
                     (default rank: the sum of the input ranks)

    result = combine(adapters, weights, CombineConfig(method="ties", density=0.3), progress=cb)
    write_combined(result, out_dir)

combine() is a pure function of its inputs (DARE masks come from the seed, the module name and
the input's position), reports progress through a callback and can be cancelled between modules,
so a CLI, a server job or a test can drive it.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorad.deltas.adapter_io import (
    Adapter,
    package_versions,
    peft_tensors,
    provenance_header,
    read_adapter,
    write_adapter,
)
from lorad.deltas.factor import Factored, factor_dense, factor_sum, torch_threads
from lorad.deltas.methods import SIGN_METHODS, combine_dense
from lorad.errors import ConfigError, InvalidAdapterError, LoradError

METHODS = ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
LOW_RANK_METHODS = ("linear", "svd", "cat")  # never form the dense delta
SPARSIFYING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")

Progress = Callable[[int, int, str], None]  # (modules done, modules total, module just done)


class CombineCancelled(LoradError):
    """The caller cancelled a combination between two modules."""


@dataclass
class CombineConfig:
    """How adapters are combined.

    method: one of METHODS.
    rank: target rank R of every module; None = the method's default (sum of input ranks, exact
        for linear/cat; the largest input rank for svd). cat refuses a rank (it keeps them all).
    density: fraction of each delta's entries kept by ties / dare_* / magnitude_prune, in (0, 1].
    majority_sign_method: how ties / dare_ties elect the sign: total (sum of values) or frequency
        (count of signs).
    seed: seed of the DARE masks; the same seed gives the same adapter, byte for byte.
    """

    method: str = "linear"
    rank: int | None = None
    density: float = 0.2
    majority_sign_method: str = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ConfigError(f"rank: must be a positive integer, got {self.rank!r}")
        if self.rank is not None and self.method == "cat":
            raise ConfigError("rank: cat keeps every input direction (rank = the sum of the input ranks); "
                              "use --method linear --rank R to truncate")
        if not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density: must lie in (0, 1], got {self.density!r}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ConfigError(f"majority_sign_method: {self.majority_sign_method!r} is not one of "
                              f"{', '.join(SIGN_METHODS)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed: must be a non-negative integer, got {self.seed!r}")

    def as_dict(self) -> dict:
        out = {"method": self.method, "rank": self.rank}
        if self.method in SPARSIFYING_METHODS:
            out["density"] = self.density
        if self.method in ("ties", "dare_ties"):
            out["majority_sign_method"] = self.majority_sign_method
        if self.method.startswith("dare"):
            out["seed"] = self.seed
        return out


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]  # (out, in)
    input_ranks: list[int]  # per input adapter, 0 where it does not adapt this module
    rank: int  # written
    error: float  # relative Frobenius error of the factoring
    norm: float  # ||combined delta||_F
    residual: float


@dataclass
class CombineResult:
    config: CombineConfig
    inputs: list[Adapter]
    weights: list[float]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # name -> (A [k, in], B [out, k])
    modules: list[ModuleReport]
    seconds: float
    warnings: list[str]

    @property
    def overall_error(self) -> float:
        """sqrt(sum of squared residuals) / sqrt(sum of squared norms), over all modules."""
        total = sum(m.norm**2 for m in self.modules)
        return (sum(m.residual**2 for m in self.modules) / total) ** 0.5 if total > 0 else 0.0

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    @property
    def base_model_name(self) -> str:
        names = [a.base_model_name for a in self.inputs if a.base_model_name]
        return names[0] if names else ""

    def provenance(self) -> dict:
        digests = {a.base_digest for a in self.inputs if a.base_digest}
        return {
            **provenance_header("combine"),
            "base_model": {"name": self.base_model_name, "weights_digest": digests.pop() if len(digests) == 1 else None},
            "combine": self.config.as_dict(),
            "inputs": [{**a.describe(), "weight": w} for a, w in zip(self.inputs, self.weights)],
            "error": {
                "overall": self.overall_error,
                "max_module": self.max_error,
                "modules": {m.name: {"rank": m.rank, "input_ranks": m.input_ranks, "error": m.error}
                            for m in self.modules},
            },
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "versions": package_versions(),
        }


def check_compatible(adapters: list[Adapter]) -> list[str]:
    """Refuse adapters made for different bases; return warnings for what only looks different."""
    shapes: dict[str, tuple[tuple[int, int], Adapter]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            seen = shapes.setdefault(name, (module.shape, adapter))
            if seen[0] != module.shape:
                raise InvalidAdapterError(
                    f"{adapter.path} and {seen[1].path} disagree on {name}: weight [out, in] {list(module.shape)} "
                    f"vs {list(seen[0])}; they were trained on different bases")
    digests = {a.base_digest: a for a in adapters if a.base_digest}
    if len(digests) > 1:
        (d1, a1), (d2, a2) = list(digests.items())[:2]
        raise InvalidAdapterError(
            f"{a1.path} was trained on base weights {d1} and {a2.path} on {d2}: combining deltas of "
            "different bases is meaningless")
    names = {a.base_model_name for a in adapters if a.base_model_name}
    if len(names) > 1:
        return [f"the inputs name different bases ({', '.join(sorted(names))}); their shapes agree, so they "
                "were combined: check they really share one base"]
    return []


def _weighted_factors(adapters: list[Adapter], weights: list[float], name: str):
    """Per input: (w_i s_i B_i [out, r_i], A_i [r_i, in]) float32, or None where it does not adapt `name`."""
    out = []
    for adapter, w in zip(adapters, weights):
        module = adapter.modules.get(name)
        out.append(None if module is None else (module.b.float() * (w * module.scale), module.a.float()))
    return out


def weighted_delta(adapters: list[Adapter], weights: list[float], name: str) -> torch.Tensor:
    """sum_i w_i dW_i of one module, dense [out, in] float32 (for merging into a base)."""
    terms = [t for t in _weighted_factors(adapters, weights, name) if t is not None]
    out = terms[0][0] @ terms[0][1]
    for b, a in terms[1:]:
        out.addmm_(b, a)
    return out


def _module_names(adapters: list[Adapter]) -> list[str]:
    """Every adapted module, in natural order (layer 2 before layer 10)."""
    names = {name for adapter in adapters for name in adapter.modules}
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


def _factor_module(config: CombineConfig, adapters: list[Adapter], weights: list[float], name: str) -> Factored:
    aligned = _weighted_factors(adapters, weights, name)
    terms = [t for t in aligned if t is not None]
    rank_sum = sum(a.shape[0] for _, a in terms)
    if config.method == "cat":
        b = torch.cat([b for b, _ in terms], dim=1)  # [out, K]
        a = torch.cat([a for _, a in terms], dim=0)  # [K, in]
        # ||B A||_F^2 = trace((B^T B)(A A^T)): K x K products, no dense [out, in] matrix
        norm = float(((b.double().T @ b.double()) * (a.double() @ a.double().T)).sum().clamp(min=0)) ** 0.5
        return Factored(a=a, b=b, error=0.0, norm=norm, residual=0.0)
    if config.method in ("linear", "svd"):
        default = rank_sum if config.method == "linear" else max(a.shape[0] for _, a in terms)
        return factor_sum(terms, config.rank or default)
    # the sparsifying methods see every input's task vector: zero where an input does not adapt the module
    shape = (terms[0][0].shape[0], terms[0][1].shape[1])
    taus = [t[0] @ t[1] if t is not None else torch.zeros(shape) for t in aligned]  # [out, in] each
    dense = combine_dense(config.method, taus, density=config.density, sign_method=config.majority_sign_method,
                          seed=config.seed, module=name)
    return factor_dense(dense, config.rank or rank_sum)


def combine(adapters: list[Adapter], weights: list[float], config: CombineConfig,
            progress: Progress | None = None, cancel: threading.Event | None = None,
            threads: int | None = 1) -> CombineResult:
    """Combine adapters module by module (see the module docstring); nothing is written.

    threads: torch intra-op threads while combining (lorad.deltas.factor.torch_threads); None
    leaves the process setting alone (what a server calling from a side thread wants)."""
    if not adapters:
        raise ConfigError("adapters: give at least one adapter")
    if len(weights) != len(adapters):
        raise ConfigError(f"weights: {len(weights)} weights for {len(adapters)} adapters")
    for path, w in zip((a.path for a in adapters), weights):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w != w or abs(w) == float("inf"):
            raise ConfigError(f"weights: {w!r} (for {path}) is not a finite number")
    warnings = check_compatible(adapters)
    if all(w == 0 for w in weights):
        raise ConfigError("weights: all weights are 0; the combination would be empty")
    started = time.perf_counter()
    names = _module_names(adapters)
    factors, reports = {}, []
    with torch.no_grad(), torch_threads(threads):
        for done, name in enumerate(names, 1):
            if cancel is not None and cancel.is_set():
                raise CombineCancelled(f"combination cancelled after {done - 1} of {len(names)} modules")
            fact = _factor_module(config, adapters, weights, name)
            factors[name] = (fact.a, fact.b)
            out_in = next(a.modules[name].shape for a in adapters if name in a.modules)
            reports.append(ModuleReport(
                name=name, shape=out_in,
                input_ranks=[a.modules[name].rank if name in a.modules else 0 for a in adapters],
                rank=fact.rank, error=fact.error, norm=fact.norm, residual=fact.residual))
            if progress is not None:
                progress(done, len(names), name)
    return CombineResult(config=config, inputs=adapters, weights=list(weights), factors=factors, modules=reports,
                         seconds=time.perf_counter() - started, warnings=warnings)


def write_combined(result: CombineResult, output_dir: str | Path) -> Path:
    """The combined adapter as a PEFT folder (float32 factors) with its provenance."""
    tensors, config = peft_tensors(result.factors, base_model_name=result.base_model_name)
    return write_adapter(output_dir, tensors, config, result.provenance())


def parse_weighted(spec: str) -> tuple[Path, float]:
    """'DIR' or 'DIR:WEIGHT' (weight 1 when omitted; negative weights allowed)."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).is_dir():
        return Path(spec), 1.0
    try:
        return Path(head), float(tail)
    except ValueError:
        raise ConfigError(f"{spec}: the weight after ':' must be a number, got {tail!r}") from None


def read_weighted(specs: list[str]) -> tuple[list[Adapter], list[float]]:
    pairs = [parse_weighted(s) for s in specs]
    return [read_adapter(p) for p, _ in pairs], [w for _, w in pairs]
