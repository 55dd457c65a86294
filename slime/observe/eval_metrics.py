"""Per-dataset evaluation metrics: mean reward, accuracy, unbiased pass@k, response length."""

from __future__ import annotations

import math
import numbers
from typing import Any

from slime.utils.types import Sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k), the chance that
    k of the n drawn without replacement include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))  # the ratio of binomials, without overflow


def ks_for(n: int) -> list[int]:
    """1, 2, 4, … up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def is_correct(sample: Sample | None, reward: float) -> bool:
    """A dict reward's `acc` when it has one, else a reward of at least 1 (every built-in grader's full credit)."""
    if sample is not None and isinstance(sample.reward, dict) and "acc" in sample.reward:
        return bool(sample.reward["acc"])
    return reward >= 1.0


def dataset_metrics(name: str, data: dict[str, Any], n_per_prompt: int) -> dict[str, float]:
    """`data`: {"rewards": [float per sample, prompt by prompt], "samples": [Sample] (optional)}, as an evaluation
    rollout returns it. Samples with no reward (None) count as wrong."""
    rewards = [float(r) if isinstance(r, numbers.Real) else None for r in data["rewards"]]
    samples = data.get("samples") or [None] * len(rewards)
    if len(samples) != len(rewards) or len(rewards) % n_per_prompt:
        raise ValueError(
            f"eval {name}: {len(rewards)} rewards and {len(samples)} samples do not form prompts of "
            f"{n_per_prompt} samples"
        )
    correct = [r is not None and is_correct(s, r) for s, r in zip(samples, rewards, strict=True)]
    scored = [r for r in rewards if r is not None]
    p = f"eval/{name}"
    out = {
        f"{p}/reward_mean": sum(scored) / max(len(scored), 1),
        f"{p}/accuracy": sum(correct) / max(len(correct), 1),
        f"{p}/num_prompts": len(rewards) // n_per_prompt,
    }
    groups = [correct[i : i + n_per_prompt] for i in range(0, len(correct), n_per_prompt)]
    for k in ks_for(n_per_prompt):
        out[f"{p}/pass@{k}"] = sum(pass_at_k(n_per_prompt, sum(g), k) for g in groups) / max(len(groups), 1)
    if samples and samples[0] is not None:
        out[f"{p}/response_len_mean"] = sum(s.response_length for s in samples) / len(samples)
        out[f"{p}/truncated_ratio"] = sum(s.status == Sample.Status.TRUNCATED for s in samples) / len(samples)
    return out
