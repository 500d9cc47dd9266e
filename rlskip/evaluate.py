"""``python -m rlskip.evaluate ckpt=<run dir> [key=value ...]``: the policy against the full model and baselines.

By default on the run's own task and held-out data (its ``config.yaml``), on one runtime and with the run's
generation settings, every method (:mod:`rlskip.methods`) is scored for task quality, analytic FLOPs ratio (to
the full model at the same lengths) and measured wall-clock ratio at batch 1 and batched
(:func:`rlskip.evaluation.latency_ratio`: warm-up excluded, alternating repeats, medians). Batched latency is
reported twice: with plan-aware batching (``latency_ratio_batched``: plans decided per pool, batches of
agreeing plans, :mod:`rlskip.batching`, as inference and serving run) and with FIFO batches
(``latency_ratio_batched_fifo``); the full model is batched the same way in each (plan-aware: its pools cut
by the same rule, one plan, so batches of similar length), so the ratio holds what the plans save. Methods:

- ``full``: the unmodified model (ratios 1 by definition);
- ``policy``: the learned policy's deterministic decisions; ``policy@b=<budget>`` for each budget when the
  policy is budget-conditioned;
- ``layerdrop``: a static plan skipping every sub-layer of every second layer of each stack (the first
  layer is fixed on), LayerDrop's pruning at inference;
- ``static@<point>``: the best static plan with no more FLOPs than the policy point, found by greedy
  search on training instances (:func:`rlskip.evaluation.greedy_static_search`, or the run's
  ``eval.static_search=influence``: ShortGPT's block-influence order, :func:`rlskip.evaluation.influence_static_path`);
- ``modal@<point>``: the policy point's most frequent plan on those training instances, given to every instance
  (:func:`rlskip.evaluation.modal_plan`; not when the policy drops tokens): what choosing per input adds over
  deploying one plan, which the greedy search can miss;
- ``random@<point>``: per-instance random plans whose keep probability is calibrated so the mean FLOPs
  ratio matches the policy point's (a linear guess from the all-skip floor, then up to two secant steps);
- ``lead@<point>`` (when the policy drops input tokens): every sub-layer kept and only the first fraction of
  each input's droppable tokens, the fraction calibrated the same way to the policy point's FLOPs;
- ``early_exit@<threshold>`` (generation): CALM-style confident early exit (:class:`rlskip.methods.EarlyExit`,
  greedy); ``truncate@<k>`` (classification with a single-stack encoder): every layer after ``k`` skipped.

Keys: the schema :class:`rlskip.config.EvaluateConfig` (Hydra overrides, e.g. ``thresholds=[0.5,0.9]``).
Writes ``eval.json`` (every method with quality, flops_ratio, latency_ratio_b1, latency_ratio_batched,
latency_ratio_batched_fifo),
``eval.csv`` and ``pareto.png`` (quality against FLOPs ratio and against latency ratio), all atomically.
Every error is one line on stderr starting with ``error:`` and exit code 2.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from rlskip.config import compose

COLUMNS = (
    "method", "kind", "quality", "flops_ratio", "latency_ratio_b1", "latency_ratio_batched", "latency_ratio_batched_fifo",
    "param",
)


# ---- configuration and data -----------------------------------------------------------------------------
def evaluation_config(args: DictConfig):
    """The run's config with the command line's data overrides applied."""
    from rlskip.inference import run_config, run_env

    cfg = run_config(Path(args.ckpt))
    OmegaConf.set_readonly(cfg, False)
    cfg.env = run_env(cfg, Path(args.ckpt))
    if args.env is not None:
        cfg.env = OmegaConf.to_container(compose([f"env={args.env}"]).env)
    if args.split is not None:
        cfg.env.eval_split = args.split
    if args.data_files is not None:
        cfg.env.eval_data_files = args.data_files
    if args.repeats < 1:
        raise ValueError(f"repeats must be positive, got {args.repeats}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"limit must be positive, got {args.limit}")
    for key in ("latency_instances", "latency_batch", "static_search_instances"):
        if args[key] is not None:
            if args[key] < 1:
                raise ValueError(f"{key} must be positive, got {args[key]}")
            cfg.eval[key] = args[key]
    return cfg


@dataclass
class Row:
    method: str
    kind: str
    quality: float
    flops_ratio: float
    latency_ratio_b1: float = 1.0
    latency_ratio_batched: float = 1.0
    latency_ratio_batched_fifo: float = 1.0
    param: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {c: getattr(self, c) for c in COLUMNS}
        d.update(self.extra)
        return d


def evaluate(args: DictConfig) -> dict:
    """Run every method; returns the content of ``eval.json`` and writes the outputs."""
    from tqdm import tqdm

    from rlskip.config import generation_settings
    from rlskip.encoding import encoder_for
    from rlskip.envs.data import build_task, load_examples, with_task_defaults
    from rlskip.execute import Executor
    from rlskip.evaluation import (
        EvalData, calibrate_keep_prob, latency_ratio, lead_fraction, modal_plan, run_method, static_at, static_search_path,
    )
    from rlskip.checkpoint import load_checkpoint, verify_backbone
    from rlskip.inference import load
    from rlskip.methods import (
        EarlyExit, every_other_layer_bits, full_model, lead_tokens, planned, policy_plans, random_plans, static_plan,
        truncation_bits,
    )

    cfg = evaluation_config(args)
    run_dir = Path(args.ckpt)
    sm = load(run_dir, name=args.name, backbone=args.backbone, threshold=args.threshold)
    threshold = sm.threshold
    task = build_task(cfg.env, cfg.seed)
    if task.kind != sm.kind:
        raise ValueError(f"task {cfg.env.name} is a {task.kind} task but the checkpoint's backbone is for {sm.kind}")
    # the run's own split (its eval.limit), so held-out rows stay held out; limit= takes a part of them
    train_ex, eval_ex, _ = load_examples(cfg.env, task, cfg.eval.limit)
    eval_ex = eval_ex[: args.limit]
    if not eval_ex:
        raise ValueError("no held-out instances to evaluate on (check split=, data_files=, limit=)")
    # the task's own input handling (pairs, and for another task its prompt and label words) on this backbone
    cfg = with_task_defaults(cfg, task, sm.runtime)
    encoder = encoder_for(sm.tokenizer, sm.runtime, cfg.env, cfg.backbone.get("chat", False), task.pair_truncation)
    ex = Executor(sm.runtime, encoder, task.kind, generation_settings(cfg), cfg.env.label_words)
    space, policy = sm.space, sm.policy
    data = EvalData.encode(ex, eval_ex)
    lat = data.head(cfg.eval.latency_instances)
    lat_b1 = lat.head(max(8, len(lat) // 4))
    if policy.budget_input:
        budgets = args.budgets
        if budgets is None:  # the calibrated range in steps of 0.1 (or quarters for a policy calibrated at one threshold)
            grid = sorted(sm.thresholds) if sm.thresholds else [0.25, 1.0]
            budgets = [b for b in (round(0.1 * i, 1) for i in range(1, 11)) if grid[0] <= b <= grid[-1]] if sm.thresholds else [0.25, 0.5, 0.75, 1.0]
        for b in budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budgets must be FLOPs ratios in (0, 1], got {b}")
            sm.source(b)  # a budget outside a calibrated range fails here, in one line
        points = [(f"b={b:g}", b) for b in budgets]
    elif args.budgets is not None:
        raise ValueError("budgets= needs a budget-conditioned policy; this one has a single operating point")
    else:
        points = [("", None)]

    def row(name, kind, method, param=None, **extra) -> Row:
        res = run_method(ex, task, data, method)
        lb1 = latency_ratio(ex, lat_b1, method, 1, args.repeats)
        lbt = latency_ratio(ex, lat, method, cfg.eval.latency_batch, args.repeats, plan_aware=True)
        # a method without plans (early exit) has no plan-aware batching: its FIFO figure is the batched one
        fifo = latency_ratio(ex, lat, method, cfg.eval.latency_batch, args.repeats) if hasattr(method, "source") else lbt
        if kind == "policy" and space.token_dropping:
            extra = {**extra, "input_kept_ratio": res.input_kept_ratio}
        return Row(name, kind, res.quality, res.flops_ratio, lb1, lbt, fifo, param, extra)

    # the plan of work: a list of thunks, so the progress bar counts methods
    full = run_method(ex, task, data, planned(full_model(space)))
    rows: list[Row] = [Row("full", "full", full.quality, full.flops_ratio)]
    policy_rows: list[Row] = []
    jobs: list[tuple[str, Callable[[], list[Row]]]] = []
    for label, b in points:
        name = "policy" + (f"@{label}" if label else "")

        def run_policy(name=name, b=b):
            r = row(name, "policy", planned(sm.source(b)), param=b)
            policy_rows.append(r)
            return [r]

        jobs.append((name, run_policy))
    for other in args.compare:  # another policy for the same generator (e.g. one trained for a single budget)
        ckpt = load_checkpoint(other, args.name)
        try:
            verify_backbone(ckpt, sm.model)
        except ValueError as e:
            raise ValueError(f"compare={other} was trained on another generator: {e}") from None
        other_policy = ckpt.build_policy()
        if other_policy.budget_input:
            raise ValueError(f"compare={other} is budget-conditioned; compare policies trained for one operating point")
        source = policy_plans(other_policy, space, float(ckpt.extra.get("threshold", 0.5)))
        label = f"policy:{Path(other).name}"
        jobs.append((label, lambda label=label, source=source: [row(label, "policy_compared", planned(source))]))
    jobs.append(("layerdrop", lambda: [row("layerdrop", "layerdrop", planned(static_plan(space, every_other_layer_bits(space))))]))

    def static_rows():
        target = min(r.flops_ratio for r in policy_rows)
        search = EvalData.encode(ex, train_ex[: cfg.eval.static_search_instances])
        path = static_search_path(ex, task, search, target, cfg.eval.get("static_search", "greedy"))
        out = []
        for (label, _), pr in zip(points, policy_rows):
            equal, _ = static_at(path, pr.flops_ratio)
            skipped = space.skipped_names(equal["bits"])
            out.append(row(f"static@{label or 'policy'}", "static", planned(static_plan(space, equal["bits"])), pr.flops_ratio, skipped=skipped))
        for (label, b), pr in zip(points, policy_rows):
            found = modal_plan(ex, search, sm.source(b))
            if found is not None:
                bits, share = found
                out.append(row(f"modal@{label or 'policy'}", "modal", planned(static_plan(space, bits)), skipped=space.skipped_names(bits), share=share))
        return out

    def random_rows():
        floor = run_method(ex, task, data, planned(static_plan(space, torch.zeros(space.n_bits, dtype=torch.bool))))
        out = []
        for (label, _), pr in zip(points, policy_rows):
            p = calibrate_keep_prob(
                lambda q: run_method(ex, task, data, planned(random_plans(space, q))).flops_ratio, pr.flops_ratio, floor.flops_ratio
            )
            out.append(row(f"random@{label or 'policy'}", "random", planned(random_plans(space, p)), param=p, keep_prob=p))
        return out

    def lead_rows():
        out = []
        for (label, _), pr in zip(points, policy_rows):
            if not pr.extra.get("input_kept_ratio", 1.0) < 1.0:
                continue
            q = lead_fraction(ex, task, data, pr.flops_ratio)
            out.append(row(f"lead@{label or 'policy'}", "lead", planned(lead_tokens(space, q)), param=q, fraction=q))
        return out

    jobs += [("static", static_rows), ("random", random_rows)]
    if space.token_dropping:
        jobs.append(("lead", lead_rows))
    if task.kind == "generation":
        for th in args.thresholds:
            jobs.append((f"early_exit@{th:g}", lambda th=th: [row(f"early_exit@{th:g}", "early_exit", EarlyExit(th), param=th)]))
    elif sm.runtime.kind == "encoder":
        layers = 1 + max(c.layer for c in space.candidates)
        for k in range(1, layers - 1):
            jobs.append((f"truncate@{k}", lambda k=k: [row(f"truncate@{k}", "truncate", planned(static_plan(space, truncation_bits(space, k))), param=k)]))
    bar = tqdm(jobs, desc="methods", disable=not args.progress)
    for name, job in bar:
        bar.set_postfix_str(name)
        rows += job()
    bar.close()

    result = {
        "run_dir": str(run_dir), "checkpoint": args.name, "task": cfg.env.name, "metric": task.metric,
        "n_eval": len(data), "gen_kwargs": ex.gen_kwargs, "policy_threshold": threshold,
        "latency": {"instances": len(lat), "instances_b1": len(lat_b1), "batch": cfg.eval.latency_batch, "repeats": args.repeats},
        "methods": [r.as_dict() for r in rows],
    }
    write_outputs(Path(args.out) if args.out is not None else run_dir / "eval", result)
    return result


# ---- outputs --------------------------------------------------------------------------------------------
def write_outputs(out: Path, result: dict) -> None:
    from rlskip.checkpoint import atomic_write_bytes, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in result["methods"]:
        w.writerow(row)
    atomic_write_text(out / "eval.csv", buf.getvalue())
    atomic_write_bytes(out / "pareto.png", pareto_png(result))


def pareto_png(result: dict) -> bytes:
    """Two panels, quality against FLOPs ratio and against batched latency ratio; one curve per kind of method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    kinds: dict[str, list[dict]] = {}
    for row in result["methods"]:
        kinds.setdefault(row["kind"], []).append(row)
    for ax, x_key, label in (
        (axes[0], "flops_ratio", "FLOPs ratio (to the full model)"),
        (axes[1], "latency_ratio_batched", "latency ratio, batched (to the full model)"),
    ):
        for kind, rows in kinds.items():
            rows = sorted(rows, key=lambda r: r[x_key])
            ax.plot([r[x_key] for r in rows], [r["quality"] for r in rows], marker="o", linestyle="-" if len(rows) > 1 else "", label=kind)
        ax.set_xlabel(label)
        ax.set_ylabel(f"quality ({result['metric']})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['task']}: {result['n_eval']} held-out instances, checkpoint {result['checkpoint']}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate(compose(argv, "evaluate"))
    except (ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    width = max(len(r["method"]) for r in result["methods"])
    print(f"{'method':<{width}}  quality  flops  latency_b1  latency_batched  latency_batched_fifo")
    for r in result["methods"]:
        print(
            f"{r['method']:<{width}}  {r['quality']:7.4f}  {r['flops_ratio']:5.3f}  {r['latency_ratio_b1']:10.3f}  "
            f"{r['latency_ratio_batched']:15.3f}  {r['latency_ratio_batched_fifo']:20.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
