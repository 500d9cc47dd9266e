"""What every learner logs after a batch of episodes, with Stable-Baselines3's logger (TensorBoard + CSV).

The native learner and PPO record the same keys: ``reward/*``, ``quality/*`` (``quality/margin``: the batch's
median decision margin), ``cost/flops_ratio`` (and ``cost/time_ratio``, the predicted time ratio the reward
sees, under ``env.cost=time``; the time ratio alone under ``max``),
``constraint/*``, per-candidate ``skip_rate/<name>``, the ``skip_rate/heatmap`` image (layer x sub-layer
kind) and ``tokens/keep_rate``; ``cost/latency_ratio`` is recorded when measured; a budget-conditioned run adds
``budget/<low>-<high>/quality`` and ``budget/<low>-<high>/flops_ratio`` per budget bucket of 0.1.
"""

from __future__ import annotations

import io

import numpy as np

from rlskip.space import SkipSpace

KIND_ORDER = ("enc_attn", "enc_ffn", "dec_self_attn", "dec_cross_attn", "dec_ffn", "attn", "ffn")


def batch_stats(infos: list[dict]) -> dict[str, np.ndarray]:
    """Stack the per-episode info dicts of one batch."""
    return {
        "quality": np.array([i["quality"] for i in infos], dtype=np.float64),
        "quality_full": np.array([i["quality_full"] for i in infos], dtype=np.float64),
        "cost": np.array([i["cost"] for i in infos], dtype=np.float64),
        "flops": np.array([i.get("flops_ratio", i["cost"]) for i in infos], dtype=np.float64),
        "time": np.array([i.get("time_ratio", np.nan) for i in infos], dtype=np.float64),
        "reward": np.array([i["reward"] for i in infos], dtype=np.float64),
        "bits": np.stack([np.asarray(i["plan_bits"], dtype=np.float64) for i in infos]),
        "tokens_kept": np.array([i.get("tokens_kept", np.nan) for i in infos], dtype=np.float64),
        "margin": np.array([i.get("margin", np.nan) for i in infos], dtype=np.float64),
        "budget": np.array([i.get("budget", 1.0) for i in infos], dtype=np.float64),
    }


def conditioned(constraint, stats: dict[str, np.ndarray]) -> dict:
    """``{"budget": per-instance budgets}`` for a budget-conditioned handler's update (see
    :class:`rlskip.constraints.Budget`), else ``{}``."""
    return {"budget": stats["budget"]} if getattr(constraint, "budget_range", None) else {}


def heatmap_image(space: SkipSpace, skip_rates: np.ndarray) -> np.ndarray:
    """Skip rate per (layer, sub-layer kind) as an HWC uint8 image; fixed-on cells are blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KIND_ORDER if any(c.kind == k for c in space.candidates)]
    layers = 1 + max(c.layer for c in space.candidates)
    grid = np.full((layers, len(kinds)), np.nan)
    for j, c in enumerate(space.skippable):
        grid[c.layer, kinds.index(c.kind)] = skip_rates[j]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 0.9 + 0.35 * layers), dpi=80)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("skip rate", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(plt.imread(buf)[..., :3] * 255, dtype=np.uint8)


def record_batch(logger, space: SkipSpace, stats: dict[str, np.ndarray], constraint, image: bool = False) -> None:
    """Record the rollout statistics of one batch under the shared keys."""
    from stable_baselines3.common.logger import Image

    q, qf, cost = stats["quality"], stats["quality_full"], stats["cost"]
    logger.record("reward/mean", float(stats["reward"].mean()))
    logger.record("reward/std", float(stats["reward"].std()))
    logger.record("quality/policy", float(q.mean()))
    logger.record("quality/full", float(qf.mean()))
    logger.record("quality/drop", float((qf - q).mean()))
    logger.record("cost/flops_ratio", float(stats["flops"].mean()))
    if not np.isnan(stats["time"]).any():
        logger.record("cost/time_ratio", float(stats["time"].mean()))
    logger.record("constraint/lambda", float(constraint.lam))
    logger.record("constraint/satisfied_rate", float(np.mean(constraint.satisfied(q, qf, cost))))
    rates = 1.0 - stats["bits"].mean(0)
    for name, r in zip(space.names, rates):
        logger.record(f"skip_rate/{name}", float(r))
    margins = stats["margin"][np.isfinite(stats["margin"])]
    if margins.size:
        logger.record("quality/margin", float(np.median(margins)))  # the decision margin (see SkipRollout.margin)
    if not np.isnan(stats["tokens_kept"]).all():
        logger.record("tokens/keep_rate", float(np.nanmean(stats["tokens_kept"])))
    budgets = stats["budget"]
    if budgets.max() > budgets.min():  # a budget-conditioned run: how each budget bucket fares
        edges = np.round(np.arange(0.0, 1.0 + 1e-9, 0.1), 1)
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (budgets > lo) & (budgets <= hi)
            if inside.any():
                logger.record(f"budget/{lo:.1f}-{hi:.1f}/quality", float(q[inside].mean()))
                logger.record(f"budget/{lo:.1f}-{hi:.1f}/flops_ratio", float(stats["flops"][inside].mean()))
    if image:
        logger.record("skip_rate/heatmap", Image(heatmap_image(space, rates), "HWC"), exclude=("stdout", "log", "json", "csv"))


def record_text(logger, tag: str, text: str) -> None:
    """Write a text summary (e.g. the resolved config) to the TensorBoard output of an SB3 logger."""
    from stable_baselines3.common.logger import TensorBoardOutputFormat

    for fmt in logger.output_formats:
        if isinstance(fmt, TensorBoardOutputFormat):
            fmt.writer.add_text(tag, "```\n" + text + "\n```", 0)
            fmt.writer.flush()
