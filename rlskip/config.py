"""The training configuration: a structured schema over Hydra's config groups.

``configs/config.yaml`` and the groups ``env/``, ``backbone/``, ``agent/``, ``constraint/`` hold the values;
the dataclasses below are the schema, so an unknown key or a wrong type fails before anything runs. Configs
are composed with Hydra's Compose API (not ``@hydra.main``) so that every configuration error reaches the
user as one line, and the run directory is ours to lay out (and to resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


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
    budget_in_obs: bool = False
    margin: float = 0.0  # > 0: the reward scales quality by min(1, decision margin / min(this, the full model's margin))
    task_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class WarmupConfig:
    time_budget_s: float = 0.0
    steps: Optional[int] = None
    skip_prob: float = 0.25
    lr: float = 2e-3
    batch_size: int = 64


@dataclass
class BackboneConfig:
    name_or_path: str = "synthetic-small"  # a hub id, a local folder, or synthetic-small (built here)
    tokenizer: Optional[str] = None  # defaults to name_or_path
    revision: Optional[str] = None
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


@dataclass
class AgentConfig:
    name: str = "reinforce"  # reinforce | ppo
    n_envs: int = 32
    iterations: int = 1500
    lr: float = 3e-3
    hidden: int = 64
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    token_head: bool = False
    length_input: bool = True  # the policy also reads log(1 + source length)
    group_size: int = 1  # reinforce: plans sampled per instance; > 1 uses the leave-one-out baseline (yaml: 4)
    normalize_advantage: bool = True  # scale each batch's advantages to unit spread (both agent yamls: false)
    self_critical: bool = False  # reinforce, group_size > 1: each group's first slot plays the greedy plan, the baseline of the rest
    lr_decay: float = 0.0  # reinforce: the learning rate falls linearly to 0 over this last fraction of the iterations
    policies: int = 1  # policies trained from independent seeds; calibration keeps the best (reinforce yaml: 2)
    n_steps: int = 4  # ppo only
    n_epochs: int = 4  # ppo only
    clip_range: float = 0.2  # ppo only


@dataclass
class ConstraintConfig:
    name: str = "lexicographic"  # lexicographic | lagrangian | fixed | budget
    max_quality_drop: float = 0.01
    lam: float = 0.0
    lr: float = 0.0
    budget: float = 1.0
    penalty: float = 50.0  # lexicographic: scale of the violating rewards


@dataclass
class GeneratorConfig:
    mode: str = "frozen"  # frozen | joint
    lr: float = 5e-5


@dataclass
class EvalConfig:
    limit: int = 500
    latency_instances: int = 64
    latency_batch: int = 16
    static_search_instances: int = 96
    calibration_instances: int = 1024  # held out of training (at most a quarter of it) to pick the decision threshold
    calibration_confidence: float = 0.95  # the quality drop is checked at this one-sided upper confidence bound


@dataclass
class LogConfig:
    every: int = 5
    latency_every: int = 50
    checkpoint_every: int = 50
    progress: bool = True


@dataclass
class TrainConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    run_dir: Optional[str] = None
    resume: Optional[str] = None
    device: str = "cpu"


CHOICES = {"generator.mode": ("frozen", "joint"), "agent.name": ("reinforce", "ppo")}


def compose(overrides: list[str]) -> DictConfig:
    """Compose ``configs/`` with command-line overrides and validate against :class:`TrainConfig`.

    Raises a ValueError of one line for any unknown key, unknown group option, bad value or bad syntax.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = str(resources.files("rlskip.configs"))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"bad configuration: {_one_line(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    for key, allowed in CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ValueError(f"bad configuration: {key}={OmegaConf.select(cfg, key)!r}, expected one of {list(allowed)}")
    if not 0.5 <= cfg.eval.calibration_confidence < 1.0:
        raise ValueError(f"bad configuration: eval.calibration_confidence={cfg.eval.calibration_confidence}, expected a value in [0.5, 1)")
    a = cfg.agent
    if a.group_size < 1 or a.n_envs % a.group_size:
        raise ValueError(f"bad configuration: agent.group_size={a.group_size} must be a positive divisor of agent.n_envs={a.n_envs}")
    if a.name == "ppo" and a.group_size != 1:
        raise ValueError("bad configuration: agent.group_size is for agent=reinforce (PPO's critic is its baseline); drop it or set 1")
    if a.self_critical and (a.name != "reinforce" or a.group_size < 2):
        raise ValueError("bad configuration: agent.self_critical needs agent=reinforce with agent.group_size >= 2 (the greedy plan takes one slot of each group)")
    if a.lr_decay and a.name != "reinforce":
        raise ValueError("bad configuration: agent.lr_decay is for agent=reinforce (PPO keeps SB3's constant learning rate); drop it")
    if not 0.0 <= a.lr_decay <= 1.0:
        raise ValueError(f"bad configuration: agent.lr_decay={a.lr_decay}, expected a fraction in [0, 1]")
    if a.policies < 1:
        raise ValueError(f"bad configuration: agent.policies={a.policies}, expected 1 or more")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _one_line(e: Exception) -> str:
    """Hydra's multi-line messages, reduced to the line a user needs."""
    text = str(e)
    if text.startswith("Could not override") and e.__cause__ is not None:
        key = text.split("'")[1]
        return f"unknown config key '{key}' ({str(e.__cause__).splitlines()[0]})"
    if "Available options in" in text:
        head = text.splitlines()[0]
        options = [ln.strip() for ln in text.split("Available options in", 1)[1].splitlines()[1:] if ln.startswith("\t")]
        options = options[: next((i for i, o in enumerate(options) if o.startswith("provider=")), len(options))]
        return f"{head}; available: {', '.join(options)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
