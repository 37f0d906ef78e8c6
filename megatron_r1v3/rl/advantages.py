"""GRPO group advantages (spec §3): `A = (r − mean_group) / std_group`, one value per response, shared by its tokens.

Layout: `rewards[p, g]` is response g of prompt p; flattening with `.reshape(-1)` gives sample `p * G + g`, the
order the loss expects for its per-sequence `advantages [B]`.

Std convention: the sample std (Bessel, `unbiased=True`) by default — `torch.std`'s default, which verl (the
framework R1V3 trained with) uses for GRPO; `unbiased=False` gives the population std. With G = 32 the two differ by
a factor sqrt(32/31) ≈ 1.016. `normalize_std=False` keeps `r − mean` (no division; Dr. GRPO style).

Zero-variance groups (all G rewards equal: all right or all wrong) carry no signal. Their advantage is set to
exactly 0 rather than computed as `(r − mean) / (0 + eps)`, which would turn float rounding of the mean into
advantages of order 1e-10 / eps. They are counted for logging, for DAPO dynamic sampling (`keep_informative_groups`)
and for the selective sample buffer's replay trigger.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class AdvantageStats:
    """What to log per episode; `zero_variance_fraction` is the selective sample buffer's trigger."""

    num_groups: int
    zero_variance_groups: int
    zero_variance_fraction: float  # zero_variance_groups / num_groups
    zero_advantage_fraction: float  # share of responses whose advantage is exactly 0
    reward_mean: float
    reward_std: float  # population std over all responses of the episode
    advantage_abs_mean: float

    def as_dict(self, prefix: str = "adv/") -> dict[str, float]:
        """Flat dict for the logger."""
        return {prefix + k: float(v) for k, v in asdict(self).items()}


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [num_prompts, G] with G >= 1, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Bool [num_prompts]: True where every reward of the group is equal (exact comparison)."""
    _check_rewards(rewards)
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def keep_informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling mask, bool [num_prompts]: keep groups whose rewards are not all equal."""
    return ~zero_variance_groups(rewards)


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True, unbiased: bool = True
) -> tuple[torch.Tensor, AdvantageStats]:
    """Advantages [num_prompts, G] (float32, no grad) and episode stats; see the module docstring for conventions.

    `eps` is added to the group std before dividing (guards near-constant groups); `unbiased` picks the sample
    (True) or population (False) std.
    """
    _check_rewards(rewards)
    r = rewards.detach().to(torch.float32)
    num_groups, g = r.shape
    flat = zero_variance_groups(r)
    centred = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        std = r.std(dim=1, keepdim=True, correction=1 if unbiased and g > 1 else 0)
        adv = centred / (std + eps)
    else:
        adv = centred
    adv = torch.where(flat.unsqueeze(1), torch.zeros_like(adv), adv)
    n_flat = int(flat.sum())
    stats = AdvantageStats(
        num_groups=num_groups,
        zero_variance_groups=n_flat,
        zero_variance_fraction=n_flat / num_groups if num_groups else 0.0,
        zero_advantage_fraction=float((adv == 0).float().mean()) if adv.numel() else 0.0,
        reward_mean=float(r.mean()) if r.numel() else 0.0,
        reward_std=float(r.std(correction=0)) if r.numel() else 0.0,
        advantage_abs_mean=float(adv.abs().mean()) if adv.numel() else 0.0,
    )
    return adv, stats
