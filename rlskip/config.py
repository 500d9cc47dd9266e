"""Configuration schemas, composed with Hydra for every entry point (``train``, ``evaluate``, ``generate``,
``serve``).

``configs/`` holds ``config.yaml`` (training) and the groups ``env/`` and ``backbone/`` (what a task and a
model are); ``configs/entry/`` holds ``evaluate.yaml``, ``generate.yaml`` and ``serve.yaml``. The dataclasses
below are the schemas and hold every default in one place; each agent and each constraint has its own schema,
registered as the options of the ``agent`` and ``constraint`` groups, so a key another option owns is refused
as unknown. Configs are composed with Hydra's Compose API (not ``@hydra.main``) so that every configuration
error reaches the user as one line naming the key, before anything is loaded or written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class EnvConfig:
    name: str = "synthetic"  # registered task: synthetic | xsum | cnn_dailymail | squad | glue
    task: Optional[str] = None  # subset, for glue: sst2 | mrpc | rte
    data_files: Optional[str] = None  # local JSON lines / JSON / CSV / Parquet with the hub's fields
    split: str = "train"
    eval_data_files: Optional[str] = None
    eval_split: str = "validation"
    limit: Optional[int] = None
    metric: Optional[str] = None
    max_source_tokens: int = 64
    max_new_tokens: int = 40
    num_beams: int = 1
    margin: float = 0.0  # > 0: the reward scales quality by min(1, decision margin / min(this, the full model's margin))
    fidelity: Optional[str] = None  # a metric (rougeL, accuracy, ...): score against the full model's own outputs instead
    # the reward's compute term: flops (the analytic FLOPs ratio), time (the predicted wall-clock ratio of a
    # time model measured on this machine when training starts, rlskip.cost; saved as time_model.json) or max
    # (the larger of the two: a plan pays for whichever of its FLOPs and its time it saves less of)
    cost: str = "flops"
    # instruction template around the input ({input}, {pair}) for decoder-only backbones; null: the task's
    # (the run's config.yaml records the one used)
    prompt: Optional[str] = None
    label_words: Optional[list[str]] = None  # classification with an LM head scores these; null: the task's
    task_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class WarmupConfig:
    time_budget_s: float = 0.0
    steps: Optional[int] = None
    skip_prob: float = 0.25
    lr: float = 2e-3
    batch_size: int = 64
    distill: float = 0.0  # > 0: sandwich steps, sub-networks distilled from the full model (rlskip.agents.warmup)
    token_drop: float = 0.0  # > 0: random plans also drop input tokens, at a per-instance rate up to this
    token_drop_rule: str = "random"  # random: tokens anywhere | tail: a lead of random length kept
    targets: str = "reference"  # reference: the task's targets | own: the full model's own outputs (generation)


@dataclass
class BackboneConfig:
    name_or_path: str = "synthetic-small"  # a hub id, a local folder, a GGUF file, or synthetic-small (built here)
    tokenizer: Optional[str] = None  # defaults to name_or_path
    revision: Optional[str] = None
    chat: bool = False  # prompts go through the tokenizer's chat template (instruct models)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


# ---- agents: one schema each ----------------------------------------------------------------------------
@dataclass
class AgentConfig:
    """What every learner reads."""

    name: str = MISSING
    n_envs: int = 32  # slots per batched rollout
    iterations: int = 1500
    lr: float = 3e-3
    hidden: int = 64
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 1.0
    token_head: bool = False  # decide per input token too (token dropping)
    token_features: bool = False  # the token head also reads each token's relative position and relative log-RMS
    bit_head: bool = True  # decide the attention / feed-forward candidates (false: keep them all, drop tokens only)
    # start the token head keeping about this fraction of each input's droppable tokens, the first ones (a learned
    # position term; null: none). A strong prior for news summarisation (docs/experiments.md, 2026-12-03).
    token_lead_prior: Optional[float] = None
    length_input: bool = True  # the policy also reads log(1 + input length)
    # Scale each batch's advantages to unit spread. Off: it rescales every batch by its own spread, which undoes
    # the constraint's exchange rate between quality and compute (docs/experiments.md, 2026-10).
    normalize_advantage: bool = False
    policies: int = 1  # policies trained from independent seeds; calibration keeps the best


@dataclass
class ReinforceConfig(AgentConfig):
    """Native REINFORCE (rlskip.agents.reinforce): leave-one-out baseline over ``group_size`` plans per instance."""

    name: str = "reinforce"
    group_size: int = 4  # plans sampled per instance (a divisor of n_envs); 1: a learned value baseline
    self_critical: bool = False  # each group's first slot plays the deployed (greedy) plan, the baseline of the rest
    lr_decay: float = 0.0  # the learning rate falls linearly to 0 over this last fraction of the iterations
    policies: int = 2


@dataclass
class PPOConfig(AgentConfig):
    """Stable-Baselines3 PPO on the same environment (one-step episodes: n_steps rollouts per env)."""

    name: str = "ppo"
    iterations: int = 400
    lr: float = 3e-4
    n_steps: int = 4
    n_epochs: int = 4
    clip_range: float = 0.2


# ---- constraints: one schema each ------------------------------------------------------------------------
@dataclass
class LexicographicConfig:
    """Quality first: while quality_full - quality > max_quality_drop only quality counts; then minimise FLOPs."""

    name: str = "lexicographic"
    max_quality_drop: float = 0.01
    penalty: float = 50.0  # scale of violating rewards: 1% more violations must save ~0.5 of the FLOPs


@dataclass
class LagrangianConfig:
    """Minimise FLOPs s.t. the quality drop <= max_quality_drop, by dual ascent on the multiplier."""

    name: str = "lagrangian"
    max_quality_drop: float = 0.01
    lam_init: float = 1.0
    lr: float = 0.5


@dataclass
class FixedConfig:
    """Weighted-sum baseline: reward = quality - lam * cost (max_quality_drop only judges success)."""

    name: str = "fixed"
    lam: float = 0.5
    max_quality_drop: float = 0.01


@dataclass
class BudgetConfig:
    """Budget form: FLOPs ratio <= budget, maximise quality."""

    name: str = "budget"
    budget: float = 0.5
    # [low, high]: train one budget-conditioned policy for every budget in it (each instance draws one, the
    # policy reads it); inference then takes budget= per request. null: one policy for `budget`
    budget_range: Optional[list[float]] = None


AGENTS = {"reinforce": ReinforceConfig, "ppo": PPOConfig}
CONSTRAINTS = {"lexicographic": LexicographicConfig, "lagrangian": LagrangianConfig, "fixed": FixedConfig, "budget": BudgetConfig}


@dataclass
class GeneratorConfig:
    mode: str = "frozen"  # frozen | joint (tune the generator under sampled plans, alongside the policy)
    lr: float = 5e-5
    # joint mode, > 0: each instance also runs under the all-ones plan, trained on its target, and its sampled
    # plan's row is distilled toward that prediction with this weight (rlskip.agents.joint)
    distill: float = 0.0


@dataclass
class EvalConfig:
    limit: int = 500  # held-out instances for the final evaluation
    latency_instances: int = 64
    latency_batch: int = 16
    static_search_instances: int = 96
    # how the best static plan at the policy's FLOPs is found: greedy (drop the sub-layer whose removal costs the
    # least quality, one at a time: quadratic in the sub-layers) or influence (ShortGPT's block influence, one pass)
    static_search: str = "greedy"
    calibration_instances: int = 1024  # held out of training (at most a quarter of it) to pick the decision threshold
    calibration_confidence: float = 0.95  # the quality drop must hold at this one-sided upper confidence bound


@dataclass
class LogConfig:
    every: int = 5  # iterations between TensorBoard scalars
    latency_every: int = 50  # iterations between measured wall-clock ratios
    checkpoint_every: int = 50
    progress: bool = True


@dataclass
class TrainConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    agent: Any = MISSING  # one of AGENTS
    constraint: Any = MISSING  # one of CONSTRAINTS
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    run_dir: Optional[str] = None  # default: runs/<env>-<agent>-<timestamp>
    resume: Optional[str] = None  # a run directory to continue
    device: str = "cpu"  # cpu | cuda | cuda:<index> | auto (under torchrun, cuda means each rank's own GPU)
    dist_timeout_s: float = 300.0  # torchrun: a collective waiting this long for a stopped peer fails the run


@dataclass
class GenerateConfig:
    ckpt: str = MISSING  # the run directory
    name: str = "last"  # the checkpoint
    text: Optional[str] = None  # one input, or:
    input: Optional[str] = None  # a file: one text per line, or JSON lines with a text or document field
    output: Optional[str] = None  # write JSON lines there instead of printing
    backbone: Optional[str] = None  # a local generator folder instead of the checkpoint's reference
    threshold: Optional[float] = None  # default: the checkpoint's calibrated one, else 0.5
    budget: Optional[float] = None  # budget-conditioned policies
    max_new_tokens: Optional[int] = None  # default: the run's
    num_beams: Optional[int] = None  # default: the run's
    batch_size: int = 16
    plan_aware: bool = True  # batch inputs whose plans agree, by length within a plan (rlskip.batching); false: consecutive batches


@dataclass
class EvaluateConfig:
    ckpt: str = MISSING  # the run directory
    name: str = "last"  # the checkpoint
    env: Optional[str] = None  # another task config (a file of configs/env/), default the run's
    split: Optional[str] = None  # held-out split, default the run's env.eval_split
    data_files: Optional[str] = None  # held-out data file, default the run's
    limit: Optional[int] = None  # held-out instances, default the run's eval.limit
    # budget-conditioned policies: the budgets to draw the policy's curve at (default: its calibrated range in
    # steps of 0.1, or 0.25, 0.5, 0.75, 1.0)
    budgets: Optional[list[float]] = None
    compare: list[str] = field(default_factory=list)  # other run directories' policies on the same generator, as points
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.95])  # early exit
    threshold: Optional[float] = None  # the policy's keep threshold, default the checkpoint's calibrated one
    backbone: Optional[str] = None  # a local generator folder instead of the checkpoint's reference
    latency_instances: Optional[int] = None  # default the run's eval.latency_instances
    latency_batch: Optional[int] = None  # default the run's eval.latency_batch
    repeats: int = 3  # latency repeats
    static_search_instances: Optional[int] = None  # default the run's eval.static_search_instances
    progress: bool = True
    out: Optional[str] = None  # output folder, default <run dir>/eval


@dataclass
class ServeConfig:
    ckpt: str = MISSING  # the run directory
    name: str = "last"  # the checkpoint
    backbone: Optional[str] = None  # a local generator folder instead of the checkpoint's reference
    threshold: Optional[float] = None  # default: the checkpoint's calibrated one, else 0.5
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16  # most rows per runtime call
    max_wait_ms: float = 10.0  # work starts once the oldest request has waited this long, or enough rows wait
    max_pool: int = 64  # most waiting rows decided together, then cut into batches (plan-aware: enough rows)
    plan_aware: bool = True  # batches of agreeing plans, by length within a plan (rlskip.batching); false: consecutive batches
    full_model: bool = False  # serve the unmodified model (every plan all ones, no policy): a reference
    max_items: int = 64  # texts per request
    max_chars: int = 20000  # characters per text
    max_new_tokens_limit: int = 512  # largest max_new_tokens a request may ask for
    max_beams: int = 8  # largest num_beams a request may ask for
    threads: Optional[int] = None  # torch intra-op threads (default: torch's choice)
    log_level: str = "info"


def _register() -> None:
    cs = ConfigStore.instance()
    for name, node in AGENTS.items():
        cs.store(group="agent", name=name, node=node)
    for name, node in CONSTRAINTS.items():
        cs.store(group="constraint", name=name, node=node)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="serve_schema", node=ServeConfig)


_register()


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose ``configs/config.yaml`` (training), or ``configs/entry/<config_name>.yaml`` (``evaluate``,
    ``generate``, ``serve``: a folder of their own, so their keys do not collide with the training groups ``env`` and
    ``backbone``), with command-line overrides, validated against its schema.

    Raises a ValueError of one line for any unknown key, unknown group option, bad value or bad syntax.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = str(resources.files("rlskip.configs"))
    if config_name != "config":
        config_dir = str(resources.files("rlskip.configs") / "entry")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ValueError(f"bad configuration: missing value for {', '.join(missing)} (give {missing[0]}=...)")
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"bad configuration: {_one_line(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    if config_name == "config":
        validate_train(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"bad configuration: {key}={value!r}, expected {expected}")


def validate_train(cfg: DictConfig) -> None:
    """Ranges, divisibility and combinations a schema's types cannot say; one line naming the key."""

    def positive(key: str, allow_zero: bool = False) -> None:
        v = OmegaConf.select(cfg, key)
        if v is None:
            return
        ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
        if not ok:
            raise _bad(key, v, "a finite number " + (">= 0" if allow_zero else "> 0"))

    if not (cfg.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", cfg.device)):
        raise _bad("device", cfg.device, "cpu, cuda, cuda:<index> or auto")
    positive("dist_timeout_s")
    if cfg.eval.static_search not in ("greedy", "influence"):
        raise _bad("eval.static_search", cfg.eval.static_search, "one of ['greedy', 'influence']")
    if cfg.generator.mode not in ("frozen", "joint"):
        raise _bad("generator.mode", cfg.generator.mode, "one of ['frozen', 'joint']")
    for key in (
        "agent.n_envs", "agent.iterations", "agent.lr", "agent.hidden", "agent.policies", "agent.max_grad_norm",
        "env.max_source_tokens", "env.max_new_tokens", "env.num_beams", "eval.limit", "eval.latency_instances",
        "eval.latency_batch", "eval.static_search_instances", "eval.calibration_instances", "log.every",
        "log.latency_every", "log.checkpoint_every", "generator.lr", "backbone.warmup.lr", "backbone.warmup.batch_size",
    ):
        positive(key)
    for key in ("agent.entropy_coef", "agent.value_coef", "env.margin", "backbone.warmup.time_budget_s", "generator.distill"):
        positive(key, allow_zero=True)
    if cfg.env.limit is not None:
        positive("env.limit")
    if cfg.backbone.warmup.steps is not None:
        positive("backbone.warmup.steps")
    if not 0.0 <= cfg.backbone.warmup.skip_prob < 1.0:
        raise _bad("backbone.warmup.skip_prob", cfg.backbone.warmup.skip_prob, "a probability in [0, 1)")
    if not 0.0 <= cfg.backbone.warmup.token_drop < 1.0:
        raise _bad("backbone.warmup.token_drop", cfg.backbone.warmup.token_drop, "a rate in [0, 1)")
    if cfg.backbone.warmup.token_drop_rule not in ("random", "tail"):
        raise _bad("backbone.warmup.token_drop_rule", cfg.backbone.warmup.token_drop_rule, "one of ['random', 'tail']")
    if cfg.backbone.warmup.targets not in ("reference", "own"):
        raise _bad("backbone.warmup.targets", cfg.backbone.warmup.targets, "one of ['reference', 'own']")
    if cfg.backbone.warmup.targets == "own" and cfg.env.name == "glue":
        raise _bad("backbone.warmup.targets", "own", "reference with env=glue (own outputs replace a generation task's targets)")
    if not (math.isfinite(cfg.backbone.warmup.distill) and cfg.backbone.warmup.distill >= 0.0):
        raise _bad("backbone.warmup.distill", cfg.backbone.warmup.distill, "a weight >= 0")
    if cfg.backbone.warmup.distill > 0.0 and cfg.backbone.warmup.batch_size < 2:
        raise _bad("backbone.warmup.batch_size", cfg.backbone.warmup.batch_size, ">= 2 with backbone.warmup.distill (each instance runs twice)")
    if not 0.5 <= cfg.eval.calibration_confidence < 1.0:
        raise _bad("eval.calibration_confidence", cfg.eval.calibration_confidence, "a value in [0.5, 1)")
    a, c = cfg.agent, cfg.constraint
    if not (a.bit_head or a.token_head):
        raise _bad("agent.bit_head", False, "agent.token_head=true (a policy without either decides nothing)")
    if a.token_lead_prior is not None:
        if not a.token_head:
            raise _bad("agent.token_lead_prior", a.token_lead_prior, "null without agent.token_head=true")
        if not (math.isfinite(a.token_lead_prior) and 0.0 < a.token_lead_prior <= 1.0):
            raise _bad("agent.token_lead_prior", a.token_lead_prior, "a fraction in (0, 1]")
    if a.name == "reinforce":
        if a.group_size < 1 or a.n_envs % a.group_size:
            raise _bad("agent.group_size", a.group_size, f"a positive divisor of agent.n_envs={a.n_envs}")
        if a.self_critical and a.group_size < 2:
            raise _bad("agent.self_critical", True, "agent.group_size >= 2 (the greedy plan takes one slot of each group)")
        if not 0.0 <= a.lr_decay <= 1.0:
            raise _bad("agent.lr_decay", a.lr_decay, "a fraction in [0, 1]")
    if a.name == "ppo":
        for key in ("agent.n_steps", "agent.n_epochs", "agent.clip_range"):
            positive(key)
    if "max_quality_drop" in c and not 0.0 <= c.max_quality_drop <= 1.0:
        raise _bad("constraint.max_quality_drop", c.max_quality_drop, "a quality drop in [0, 1]")
    if c.name == "budget" and not 0.0 < c.budget <= 1.0:
        raise _bad("constraint.budget", c.budget, "a FLOPs ratio in (0, 1]")
    if c.name == "budget" and c.budget_range is not None:
        r = list(c.budget_range)
        if len(r) != 2 or not 0.0 < r[0] < r[1] <= 1.0:
            raise _bad("constraint.budget_range", r, "[low, high] with 0 < low < high <= 1")
        if not r[0] <= c.budget <= r[1]:
            raise _bad("constraint.budget", c.budget, f"a budget inside constraint.budget_range={r}")
    for key in ("constraint.penalty", "constraint.lam_init", "constraint.lr", "constraint.lam"):
        if OmegaConf.select(cfg, key) is not None:
            positive(key, allow_zero=True)
    if cfg.env.cost not in ("flops", "time", "max"):
        raise _bad("env.cost", cfg.env.cost, "flops, time or max")
    if cfg.env.cost != "flops" and cfg.constraint.name == "budget":
        raise _bad("env.cost", cfg.env.cost, "flops with constraint=budget (a budget is a FLOPs ratio)")
    if cfg.env.margin > 0 and cfg.env.num_beams != 1:
        raise _bad("env.margin", cfg.env.margin, "0 with env.num_beams > 1 (margin shaping reads greedy decoding's margins)")


def _one_line(e: Exception) -> str:
    """Hydra's multi-line messages, reduced to the line a user needs."""
    text = str(e)
    if text.startswith("Could not override") and e.__cause__ is not None:
        key = text.split("'")[1]
        return f"unknown config key '{key}' ({str(e.__cause__).splitlines()[0]})"
    if text.startswith("Error merging override") and e.__cause__ is not None:  # a value of the wrong type
        return f"{text.removeprefix('Error merging override').strip()}: {str(e.__cause__).splitlines()[0]}"
    if "Available options in" in text:
        head = text.splitlines()[0]
        options = [ln.strip() for ln in text.split("Available options in", 1)[1].splitlines()[1:] if ln.startswith("\t")]
        options = options[: next((i for i, o in enumerate(options) if o.startswith("provider=")), len(options))]
        return f"{head}; available: {', '.join(options)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def quote_value(override: str) -> str:
    """``key=value`` with the value single-quoted for Hydra, so that free text such as
    ``text=Hello, world (again) ${x}`` is read as that one string: quotes and interpolations are escaped, and
    so are the backslashes before them or at the end (Hydra reads those as escapes)."""
    key, _, value = override.partition("=")
    value = re.sub(r"(\\*)(')", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\*)(\$\{)", lambda m: m.group(1) * 2 + "\\${", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"{key}='{value}'"


def generation_settings(cfg: DictConfig) -> dict:
    """The generation options of a run (``max_new_tokens``, ``num_beams``) from its config."""
    return {"max_new_tokens": int(cfg.env.max_new_tokens), "num_beams": int(cfg.env.num_beams)}
