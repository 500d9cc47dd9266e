"""``python -m rlskip.evaluate ckpt=<run dir> [key=value ...]``: the policy against the full model and baselines.

By default on the run's own task and held-out data (its ``config.yaml``, composed with train's helpers), on
one runtime and with the run's generation settings, every method is scored for task quality, analytic FLOPs
ratio (to the full model at the same lengths) and measured wall-clock ratio at batch 1 and batched
(:func:`rlskip.evaluation.latency_ratio`: warm-up excluded, alternating repeats, medians). Methods:

- ``full``: the unmodified model (ratios 1 by definition);
- ``policy``: the learned policy's deterministic decisions; ``policy@b=<budget>`` for each budget when the
  policy is budget-conditioned;
- ``layerdrop``: a static plan skipping every sub-layer of every second layer (encoder layers 1, 3, ...; the
  first encoder layer is fixed on; decoder layers 1, 3, ...), LayerDrop's pruning at inference;
- ``static@<point>``: the best static plan with no more FLOPs than the policy point, found by greedy
  search on training instances (:func:`rlskip.evaluation.greedy_static_search`);
- ``random@<point>``: per-instance random plans whose keep probability is calibrated so the mean FLOPs
  ratio matches the policy point's (a linear guess from the all-skip floor, then up to two secant steps);
- ``early_exit@<threshold>``: CALM-style confident early exit in the decoder
  (:meth:`rlskip.runtime.bart.BartRuntime.generate_early_exit`, greedy; generation tasks only).

Keys: ``ckpt`` (required), ``name`` (checkpoint, default ``best``), ``env`` (another task config group),
``split`` and ``data_files`` (held-out data), ``limit`` (held-out instances), ``budgets`` (e.g. ``0.3,0.5``),
``thresholds`` (early exit, default ``0.5,0.8,0.95``), ``threshold`` (policy keep threshold, default the
checkpoint's calibrated one, see :func:`rlskip.inference.load`), ``backbone`` (local generator folder), ``latency_instances``, ``latency_batch``,
``repeats`` (latency repeats, default 3), ``static_search_instances``, ``progress`` (true/false), ``out``
(output folder, default ``<run dir>/eval``).

Writes ``eval.json`` (every method with quality, flops_ratio, latency_ratio_b1, latency_ratio_batched),
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

from rlskip.generate import number, parse_args
from rlskip.plan import Plan

KEYS = (
    "ckpt", "name", "env", "split", "data_files", "limit", "budgets", "thresholds", "threshold", "backbone",
    "latency_instances", "latency_batch", "repeats", "static_search_instances", "progress", "out",
)
COLUMNS = ("method", "kind", "quality", "flops_ratio", "latency_ratio_b1", "latency_ratio_batched", "param")
DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_THRESHOLDS = (0.5, 0.8, 0.95)


# ---- early exit as a plan source ------------------------------------------------------------------------
@dataclass(frozen=True)
class _ExitPlan(Plan):
    """An all-ones plan that asks :class:`_EarlyExitRouter` for confident early exit at ``threshold``."""

    threshold: float = 2.0


class _EarlyExitRouter:
    """A runtime that sends :class:`_ExitPlan` batches to ``generate_early_exit`` and everything else to the
    wrapped runtime, so the early-exit baseline runs through the same :func:`run_method` and
    :func:`latency_ratio` as every other method (same batches, same encoding, same timing)."""

    def __init__(self, rt) -> None:
        self.rt, self.space = rt, rt.space

    def observe(self, input_ids, attention_mask=None):
        return self.rt.observe(input_ids, attention_mask)

    def generate(self, obs, plan, **gen_kwargs):
        if isinstance(plan, _ExitPlan):
            return self.rt.generate_early_exit(obs, plan.threshold, **gen_kwargs)
        return self.rt.generate(obs, plan, **gen_kwargs)

    def classify(self, obs, plan, labels=None):
        return self.rt.classify(obs, plan, labels)


def early_exit_source(space, threshold: float):
    return lambda obs: (
        _ExitPlan(space, torch.ones(obs.batch_size, space.n_bits, dtype=torch.bool), None, float(threshold)),
        torch.zeros(obs.batch_size, dtype=torch.float64),
    )


# ---- static baselines -----------------------------------------------------------------------------------
def every_other_layer_bits(space) -> torch.Tensor:
    """LayerDrop-style pruning: every sub-layer of encoder and decoder layers 1, 3, 5, ... is skipped."""
    bits = torch.ones(space.n_bits, dtype=torch.bool)
    for j in range(space.n_bits):
        parts = space.name(j).split(".")
        if len(parts) == 3 and parts[0] in ("enc", "dec") and int(parts[1]) % 2 == 1:
            bits[j] = False
    return bits


# ---- configuration and data -----------------------------------------------------------------------------
def evaluation_config(run_dir: Path, args: dict):
    """The run's config with the command line's data overrides applied."""
    from omegaconf import DictConfig, OmegaConf

    from rlskip.config import compose

    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.yaml): {run_dir}")
    try:  # the resolved config as the run wrote it (not re-validated: the schema may have grown since)
        cfg = OmegaConf.load(path)
    except Exception as e:  # a damaged YAML file
        raise ValueError(f"{path} is not a valid run config: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig) or "env" not in cfg or "eval" not in cfg:
        raise ValueError(f"{path} is not a run config (no env / eval sections)")
    OmegaConf.set_readonly(cfg, False)
    if "env" in args:
        cfg.env = OmegaConf.to_container(compose([f"env={args['env']}"]).env)
    if "split" in args:
        cfg.env.eval_split = args["split"]
    if "data_files" in args:
        cfg.env.eval_data_files = args["data_files"]
    if "limit" in args:
        cfg.eval.limit = number(args, "limit", int)
    return cfg


@dataclass
class Row:
    method: str
    kind: str
    quality: float
    flops_ratio: float
    latency_ratio_b1: float = 1.0
    latency_ratio_batched: float = 1.0
    param: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {c: getattr(self, c) for c in COLUMNS}
        d.update(self.extra)
        return d


def _floats(text: str, key: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{key} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{key} is empty")
    return vals


def evaluate(args: dict[str, str]) -> dict:
    """Run every method; returns the content of ``eval.json`` and writes the outputs."""
    from tqdm import tqdm

    from rlskip.evaluation import (
        full_model, greedy_static_search, latency_ratio, policy_plans, random_plans, run_method, static_plan,
    )
    from rlskip.inference import load
    from rlskip.train import build_task, gen_kwargs, load_data

    run_dir = Path(args["ckpt"])
    cfg = evaluation_config(run_dir, args)
    sm = load(run_dir, name=args.get("name", "last"), backbone=args.get("backbone"), threshold=number(args, "threshold", float))
    threshold = sm.threshold
    task = build_task(cfg)
    if task.kind != sm.kind:
        raise ValueError(f"task {cfg.env.name} is a {task.kind} task but the checkpoint's backbone is for {sm.kind}")
    train_ex, eval_ex = load_data(cfg, task)
    if not eval_ex:
        raise ValueError("no held-out instances to evaluate on (check split=, data_files=, limit=)")
    rt, tok, space, policy = sm.runtime, sm.tokenizer, sm.space, sm.policy
    g, msl = gen_kwargs(cfg), int(cfg.env.max_source_tokens)
    lat_n = number(args, "latency_instances", int, int(cfg.eval.latency_instances))
    lat_batch = number(args, "latency_batch", int, int(cfg.eval.latency_batch))
    repeats = number(args, "repeats", int, 3)
    search_n = number(args, "static_search_instances", int, int(cfg.eval.static_search_instances))
    progress = args.get("progress", "true").lower() not in ("false", "0", "no")
    thresholds = _floats(args["thresholds"], "thresholds") if "thresholds" in args else list(DEFAULT_THRESHOLDS)
    if policy.budget_input:
        budgets = _floats(args["budgets"], "budgets") if "budgets" in args else list(DEFAULT_BUDGETS)
        for b in budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budgets must be FLOPs ratios in (0, 1], got {b}")
        points = [(f"b={b:g}", b) for b in budgets]
    elif "budgets" in args:
        raise ValueError("budgets= needs a budget-conditioned policy; this one has a single operating point")
    else:
        points = [("", None)]

    lat_ex = eval_ex[: max(1, lat_n)]
    lat_b1_ex = lat_ex[: max(8, len(lat_ex) // 4)]

    def method(name, kind, source, router=rt, param=None, **extra) -> Row:
        res = run_method(router, task, tok, eval_ex, source, g_for(kind), msl)
        lb1 = latency_ratio(router, task, tok, lat_b1_ex, source, g_for(kind), msl, 1, repeats)
        lbt = latency_ratio(router, task, tok, lat_ex, source, g_for(kind), msl, lat_batch, repeats)
        return Row(name, kind, res.quality, res.flops_ratio, lb1, lbt, param, extra)

    def g_for(kind):  # early exit decodes greedily
        return {**g, "num_beams": 1} if kind == "early_exit" else g

    # the plan of work: a list of thunks, so the progress bar counts methods
    rows: list[Row] = []
    full = run_method(rt, task, tok, eval_ex, full_model(space), g, msl)
    rows.append(Row("full", "full", full.quality, full.flops_ratio))
    policy_rows: list[Row] = []
    jobs: list[tuple[str, Callable[[], list[Row]]]] = []
    for label, b in points:
        name = "policy" + (f"@{label}" if label else "")

        def run_policy(name=name, b=b):
            r = method(name, "policy", policy_plans(policy, space, threshold, b), param=b)
            policy_rows.append(r)
            return [r]

        jobs.append((name, run_policy))
    jobs.append(("layerdrop", lambda: [method("layerdrop", "layerdrop", static_plan(space, every_other_layer_bits(space)))]))

    def static_rows():
        target = min(r.flops_ratio for r in policy_rows)
        path = greedy_static_search(rt, task, tok, train_ex[:search_n], g, msl, min_flops_ratio=target)
        out = []
        for (label, _), pr in zip(points, policy_rows):
            equal = next((p for p in path if p["flops_ratio"] <= pr.flops_ratio), path[-1])
            skipped = [space.name(j) for j in (~equal["bits"]).nonzero().flatten().tolist()]
            name = f"static@{label or 'policy'}"
            out.append(method(name, "static", static_plan(space, equal["bits"]), param=pr.flops_ratio, skipped=skipped))
        return out

    def random_rows():
        floor = run_method(rt, task, tok, eval_ex, static_plan(space, torch.zeros(space.n_bits, dtype=torch.bool)), g, msl)
        out = []
        for (label, _), pr in zip(points, policy_rows):
            p = calibrate_keep_prob(
                lambda q: run_method(rt, task, tok, eval_ex, random_plans(space, q), g, msl).flops_ratio,
                pr.flops_ratio, floor.flops_ratio,
            )
            out.append(method(f"random@{label or 'policy'}", "random", random_plans(space, p), param=p, keep_prob=p))
        return out

    jobs += [("static", static_rows), ("random", random_rows)]
    if task.kind == "generation":
        router = _EarlyExitRouter(rt)
        for th in thresholds:
            jobs.append((
                f"early_exit@{th:g}",
                lambda th=th: [method(f"early_exit@{th:g}", "early_exit", early_exit_source(space, th), router, param=th)],
            ))
    bar = tqdm(jobs, desc="methods", disable=not progress)
    for name, job in bar:
        bar.set_postfix_str(name)
        rows += job()
    bar.close()

    result = {
        "run_dir": str(run_dir), "checkpoint": args.get("name", "last"), "task": cfg.env.name, "metric": task.metric,
        "n_eval": len(eval_ex), "gen_kwargs": g, "policy_threshold": threshold,
        "latency": {"instances": len(lat_ex), "instances_b1": len(lat_b1_ex), "batch": lat_batch, "repeats": repeats},
        "methods": [r.as_dict() for r in rows],
    }
    write_outputs(Path(args["out"]) if "out" in args else run_dir / "eval", result)
    return result


def calibrate_keep_prob(ratio_at: Callable[[float], float], target: float, floor: float, tol: float = 0.01) -> float:
    """Keep probability whose measured mean FLOPs ratio is ``target``: the linear guess between the all-skip
    ``floor`` (p = 0) and the full model (p = 1), then up to two secant steps on the bracketing points."""
    lo, hi = (0.0, floor), (1.0, 1.0)
    p = min(1.0, max(0.0, (target - floor) / max(1e-9, 1.0 - floor)))
    for _ in range(2):
        r = ratio_at(p)
        if abs(r - target) <= tol:
            break
        if r > target:
            hi = (p, r)
        else:
            lo = (p, r)
        if hi[1] - lo[1] <= 1e-9:
            break
        p = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
        p = min(1.0, max(0.0, p))
    return p


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
        result = evaluate(parse_args(argv, KEYS))
    except (ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    width = max(len(r["method"]) for r in result["methods"])
    print(f"{'method':<{width}}  quality  flops  latency_b1  latency_batched")
    for r in result["methods"]:
        print(
            f"{r['method']:<{width}}  {r['quality']:7.4f}  {r['flops_ratio']:5.3f}  {r['latency_ratio_b1']:10.3f}  "
            f"{r['latency_ratio_batched']:15.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
