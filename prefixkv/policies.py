"""Allocations and methods: how long each layer's cache is, and which score picks its entries.

A method is a (scorer, allocation, eviction) triple, so comparisons are apples to apples:
every method keeps the same total number of entries for a keep fraction, and the same
decode-phase rule (except StreamingLLM, which evicts the oldest entry after the sinks).

Allocations turn a keep fraction into per-layer keep fractions:
    uniform   the same fraction in every layer
    pyramid   linearly decreasing with depth, 1.5x the mean at the bottom to 0.5x at the top
    profile   a calibrated RetentionProfile (PrefixKV offline; named ``sensitivity`` when
              the profile was made by that rule, ``prefixkv.sensitivity``)
    online    the prefix search run on each prompt's own scores (PrefixKV online)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .defaults import (
    EVICT_DISTANCE,
    METHOD_SINKS,
    OLDEST,
    PROTECT_LAST,
    RULE,
    SINK,
    check_evict_distance,
)
from .scoring import Scorer, make_scorer
from .search import PAPER, SearchSettings


class Allocation:
    """Per-layer keep fractions.  ``fractions`` returns (layers,) or (layers, batch)."""

    name = "allocation"
    needs_all_layers = False  # True when one layer's length depends on the others' scores

    def fractions(self, keep_fraction: float, layers: int, scores=None, valid=None, sink=SINK, protect_last=PROTECT_LAST):
        raise NotImplementedError


class Uniform(Allocation):
    name = "uniform"

    def fractions(self, keep_fraction, layers, scores=None, valid=None, sink=SINK, protect_last=PROTECT_LAST):
        return torch.full((layers,), float(keep_fraction), dtype=torch.float64)


class Pyramid(Allocation):
    """PyramidKV-style: more entries in lower layers, mean equal to the keep fraction."""

    name = "pyramid"

    def __init__(self, spread: float = 0.5):
        self.spread = spread

    def fractions(self, keep_fraction, layers, scores=None, valid=None, sink=SINK, protect_last=PROTECT_LAST):
        slope = torch.linspace(1 + self.spread, 1 - self.spread, layers, dtype=torch.float64) if layers > 1 else torch.ones(1, dtype=torch.float64)
        x = keep_fraction * slope
        for _ in range(layers):  # cap at 1 and hand the excess to the layers below 1
            over = x > 1
            if not bool(over.any()):
                break
            excess = float((x[over] - 1).sum())
            x = torch.where(over, torch.ones_like(x), x)
            room = (1 - x).clamp_min(0)
            x = x + room * (excess / float(room.sum()))
        return x


class Profiled(Allocation):
    """PrefixKV offline: the calibrated per-layer fractions of a profile.  Named after the
    profile's rule: ``profile`` (the prefix search) or ``sensitivity``."""

    name = "profile"

    def __init__(self, profile):
        self.profile = profile
        if getattr(profile, "rule", RULE) != RULE:
            self.name = profile.rule

    def fractions(self, keep_fraction, layers, scores=None, valid=None, sink=SINK, protect_last=PROTECT_LAST):
        values = self.profile.layer_fractions(keep_fraction)
        if len(values) != layers:
            raise ValueError(f"the profile has {len(values)} layers but the model has {layers}")
        return torch.tensor(values, dtype=torch.float64)


class Online(Allocation):
    """PrefixKV online: the search on each prompt's scores (no profile).  Returns (layers, batch).

    ``search`` sets the curve, floor and blend (the paper's by default); the protected
    entries are the cache's own (``sink``, ``protect_last``)."""

    name = "online"
    needs_all_layers = True

    def __init__(self, search: SearchSettings = PAPER):
        self.search = search

    def fractions(self, keep_fraction, layers, scores=None, valid=None, sink=SINK, protect_last=PROTECT_LAST):
        search = replace(self.search, sink=sink, protect_last=protect_last)
        columns = []
        for row in range(scores.shape[1]):
            real = scores[:, row][:, valid[row]]  # (layers, n) this row's unpadded scores
            columns.append(search.fractions(real, [keep_fraction])[0])
        return torch.stack(columns, dim=1)


ALLOCATIONS = {"uniform": Uniform, "pyramid": Pyramid}


@dataclass
class Method:
    """A named (scorer, allocation, eviction distance) triple, and its sink: the first tokens
    it always keeps (its own paper's or released code's setting, ``defaults.METHOD_SINKS``)."""

    name: str
    scorer: Scorer
    allocation: Allocation
    evict_distance: int = EVICT_DISTANCE
    compresses: bool = True
    extra: dict = field(default_factory=dict)
    sink: int = SINK


METHODS = ("full", "streaming", "h2o", "snapkv", "tova", "pyramidkv", "prefixkv", "prefixkv-online")


def make_method(
    name: str,
    profile=None,
    scorer: str | Scorer | None = None,
    scorer_params: dict | None = None,
    allocation: str | None = None,
    evict_distance: int | None = None,
    search: SearchSettings = PAPER,
    force_scorer: bool = False,
    sink: int | None = None,
) -> Method:
    """Build a method by name; ``scorer=`` / ``allocation=`` / ``sink=`` override its parts.

    ``search`` is the ``online`` allocation's curve, floor and blend (the paper's by default).
    The sink: ``sink=``, else the profile's for a profile allocation, else the method's own
    (``defaults.METHOD_SINKS``: 4 for StreamingLLM, none for H2O, SnapKV, TOVA and PyramidKV,
    1 for PrefixKV).  The decode rule: ``evict_distance=``, else the method's own (the oldest
    entry after the sinks for StreamingLLM, a profile's for a profile allocation, else 25).

    full             no compression
    streaming        recency score, uniform lengths, evict the oldest entry after the sinks
    h2o              accumulated attention (the paper's score), uniform lengths
    snapkv           window score (last 8 queries, pooled), uniform lengths
    tova             last-query score, uniform lengths
    pyramidkv        window score, pyramid lengths
    prefixkv         the profile's scorer, the profile's per-layer lengths (offline)
    prefixkv-online  accumulated score (or ``scorer=``), the search on every prompt
    custom           any ``scorer=`` with ``allocation=`` uniform | pyramid | online | profile
    """
    params = dict(scorer_params or {})
    defaults = {
        "full": ("accumulated", "uniform"),
        "streaming": ("recency", "uniform"),
        "h2o": ("accumulated", "uniform"),
        "snapkv": ("window", "uniform"),
        "tova": ("last-query", "uniform"),
        "pyramidkv": ("window", "pyramid"),
        "prefixkv": (profile.scorer if profile is not None else "accumulated", "profile"),
        "prefixkv-online": ("accumulated", "online"),
        "custom": ("accumulated", "uniform"),
    }
    if name not in defaults:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (or custom)")
    default_scorer, default_allocation = defaults[name]
    if name == "prefixkv" and profile is not None and scorer is None:
        params = params or dict(profile.scorer_params)
    scorer_obj = make_scorer(scorer or default_scorer, **params)
    alloc_name = allocation or default_allocation
    if alloc_name == "profile":
        if profile is None:
            raise ValueError(f"method {name!r} needs a retention profile (--profile PATH, from `prefixkv calibrate`)")
        profile.check_scorer(scorer_obj.name, scorer_obj.params, force=force_scorer)
        alloc: Allocation = Profiled(profile)
    elif alloc_name == "online":
        alloc = Online(search)
    elif alloc_name in ALLOCATIONS:
        alloc = ALLOCATIONS[alloc_name]()
    else:
        raise ValueError(f"unknown allocation {alloc_name!r}; choose uniform, pyramid, online or profile")
    if evict_distance is None:  # the method's own decode rule (a profile's for its allocation)
        evict_distance = OLDEST if name == "streaming" else profile.evict_distance if alloc_name == "profile" else EVICT_DISTANCE
    if sink is None:
        sink = profile.sink if alloc_name == "profile" else METHOD_SINKS[name]
    return Method(name, scorer_obj, alloc, check_evict_distance(evict_distance), compresses=name != "full", sink=sink)
