"""Batch plans of one training round: which samples, in which batches, with which augmentation seeds.

A plan is a pure function of ``(seed, round)`` and the dataset sizes, so a resumed run rebuilds the plan
of its round and skips the batches already done: it sees exactly the batches an uninterrupted run sees.
Plans hold *global* batches; under DDP each rank takes its slice (:func:`shard_batch`), so a run on
W processes with per-process batch B sees the same global batches as one process with batch W·B.

Cyclic mode (the seed's): one dataset after another in the round order, each shuffled. Mixed mode
(``--mixed-batches``): all chosen samples shuffled together, so a batch mixes datasets and specialists;
within a batch samples are grouped by specialist, then dataset, for the grouped adapter kernel.
Balanced subsampling (``--samples-per-round N``): each of the K datasets contributes an equal share
⌈N / K⌉ (all of its training set when smaller), drawn afresh every round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .datasets import NO_AUGMENT

Key = tuple[int, int, int]  # (source, sample index, augmentation seed)


def _round_rng(seed: int, round_idx: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, round_idx]))


def subsample(sizes: Sequence[int], samples_per_round: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled indices each source contributes this round (all, or a balanced share of the total)."""
    if samples_per_round is not None and samples_per_round < 1:
        raise ValueError(f"samples_per_round must be positive, got {samples_per_round}")
    share = None if samples_per_round is None else math.ceil(samples_per_round / len(sizes))
    return [rng.permutation(n)[: n if share is None else min(n, share)] for n in sizes]


def _chunks(keys: list[Key], batch_size: int, world_size: int) -> list[list[Key]]:
    """Full batches of ``keys``; a source smaller than a batch gives one batch (a multiple of world_size)."""
    if len(keys) < batch_size:
        n = len(keys) - len(keys) % world_size
        return [keys[:n]] if n else []
    return [keys[i : i + batch_size] for i in range(0, len(keys) - batch_size + 1, batch_size)]


def round_plan(
    sizes: Sequence[int],
    batch_size: int,
    seed: int,
    round_idx: int,
    samples_per_round: int | None = None,
    mixed: bool = False,
    experts: Sequence[str] | None = None,
    world_size: int = 1,
) -> list[list[Key]]:
    """Global batches of round ``round_idx`` over sources of ``sizes`` (in the round order).

    ``batch_size`` is the global batch (a multiple of ``world_size``); ``experts`` (the specialist of each
    source) orders the samples inside mixed batches. The last incomplete batch of a source (cyclic) or of
    the round (mixed) is dropped, as the seed's ``drop_last=True``.
    """
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"sizes must be positive dataset sizes, got {list(sizes)}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size must be a positive multiple of world_size ({world_size}), got {batch_size}")
    rng = _round_rng(seed, round_idx)
    chosen = subsample(sizes, samples_per_round, rng)
    total = sum(len(c) for c in chosen)
    aug_seeds = iter(np.random.SeedSequence([seed, round_idx, 1]).generate_state(total, np.uint32).tolist())
    if not mixed:
        batches: list[list[Key]] = []
        for source, idx in enumerate(chosen):
            batches += _chunks([(source, int(i), next(aug_seeds)) for i in idx], batch_size, world_size)
        return batches
    pool = [(s, int(i)) for s, idx in enumerate(chosen) for i in idx]
    order = rng.permutation(len(pool))
    keys = [(*pool[j], next(aug_seeds)) for j in order]
    rank = {e: r for r, e in enumerate(sorted(set(experts)))} if experts is not None else None
    batches = _chunks(keys, batch_size, world_size)
    if rank is not None:
        batches = [sorted(b, key=lambda k: (rank[experts[k[0]]], k[0])) for b in batches]
    return batches


def shard_batch(batch: list[Key], rank: int, world_size: int) -> list[Key]:
    """This rank's contiguous slice of a global batch (equal slices: batches are multiples of world_size)."""
    per = len(batch) // world_size
    return batch[rank * per : (rank + 1) * per]


def eval_keys(size: int, source: int, rank: int = 0, world_size: int = 1) -> list[Key]:
    """Clean-view keys of this rank's strided share of ``size`` evaluation samples of ``source``."""
    return [(source, i, NO_AUGMENT) for i in range(rank, size, world_size)]
