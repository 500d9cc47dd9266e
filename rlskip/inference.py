"""Loading a trained skip policy for inference: ``rlskip.load(run_dir)`` -> :class:`SkipModel`.

::

    import rlskip
    m = rlskip.load("runs/<run>")                  # the final ("last") checkpoint, calibrated threshold, tokenizer and generator
    m.generate(["copy 1 2 3"])                     # -> ["1 2 3"], each instance with its own plan
    m.generate(texts, return_details=True)         # -> [{"text", "generation", "flops_ratio", "skipped"}, ...]
    m.decide(texts)                                # -> Plan (what would be skipped)

Inputs are decided in pools of several batches and executed in batches of at most ``batch_size`` whose plans
agree (plan-aware batching, :mod:`rlskip.batching`); ``plan_aware=False`` runs consecutive batches instead.
Either way each input gets what it gets alone, in input order.

Decisions are deterministic: a candidate (or token) is kept where ``sigmoid(logit) >= threshold``; a higher
threshold skips more. The default threshold is the one calibrated at the end of training when the checkpoint
records it (``extra["threshold"]``), else 0.5. Generation settings (``max_new_tokens``, ``num_beams``), the input
budget (``max_source_tokens``) and, for decoder-only backbones, the prompt format are the run's own, from its
``config.yaml``. The generator is checked against the
checkpoint (SkipSpace and content hash) before anything runs, so a policy is never applied to a backbone
it was not trained on.

This module imports neither gymnasium nor Stable-Baselines3: serving needs only torch and transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlskip.backbone import load_backbone, load_tokenizer
from rlskip.batching import POOL_BATCHES, concat_plans, merge, run_pool
from rlskip.checkpoint import load_checkpoint, verify_backbone
from rlskip.config import EnvConfig, generation_settings
from rlskip.encoding import encoder_for, read_utf8_lines
from rlskip.execute import Executed, Executor
from rlskip.methods import budget_plans, policy_plans
from rlskip.plan import Plan
from rlskip.runtime import Observation, get_runtime

DEFAULT_THRESHOLD = 0.5


log = logging.getLogger("rlskip")


class SkipModel:
    """A generator with its skip policy: decides a plan per input, then runs the generator under it.

    Build it with :func:`load`. Attributes: ``model`` (the Hugging Face model), ``tokenizer``, ``policy``,
    ``runtime``, ``space``, ``threshold``, ``executor`` (its ``encoder`` cuts inputs to the run's
    ``max_source_tokens``; its ``gen_kwargs`` are the defaults of :meth:`generate`), ``kind``
    (``"generation"`` or ``"classification"``), ``checkpoint``, ``batch_size`` (most instances per runtime
    call) and ``plan_aware`` (batch instances whose plans agree; False: consecutive batches).
    """

    def __init__(
        self, model, tokenizer, policy, runtime, checkpoint, threshold: float, executor: Executor, batch_size: int = 16,
        plan_aware: bool = True, thresholds: dict[float, float] | None = None,
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.policy, self.runtime = model, tokenizer, policy, runtime
        self.thresholds = thresholds  # a budget-conditioned policy's calibrated threshold per budget
        self.checkpoint, self.space = checkpoint, runtime.space
        self.threshold, self.executor, self.kind = float(threshold), executor, executor.task_kind
        self.batch_size, self.plan_aware = batch_size, bool(plan_aware)

    # ---- inputs ---------------------------------------------------------------------------------------
    def observe(self, inputs, attention_mask: torch.Tensor | None = None) -> Observation:
        """The runtime's observation of texts (tokenised, cut to ``max_source_tokens``) or of an ``input_ids``
        tensor (``[batch, len]`` or ``[len]``; right-padded; the mask defaults to the non-pad positions)."""
        return self.executor.observe(self.token_rows(inputs, attention_mask))

    def token_rows(self, inputs, attention_mask: torch.Tensor | None = None) -> list[list[int]]:
        """The input ids of each input, as :meth:`observe` reads them (texts tokenised and cut to the run's
        ``max_source_tokens``, with a logged notice when any was cut)."""
        if isinstance(inputs, torch.Tensor):
            ids = inputs.long()
            if ids.dim() == 1:
                ids = ids[None]
            if attention_mask is None:
                attention_mask = ids != self.executor.encoder.pad_id
            rows = [r[m].tolist() for r, m in zip(ids, attention_mask.bool().view(ids.shape))]
        else:
            rows, cut = self.executor.encoder.inputs([inputs] if isinstance(inputs, str) else list(inputs))
            if cut:
                log.warning("%d of %d inputs were longer than %d tokens and were truncated", cut, len(rows), self.executor.encoder.max_tokens)
        return rows

    def source(self, budget: float | None = None):
        """The policy's plan source at this model's threshold (:func:`rlskip.methods.policy_plans`); for a
        budget-conditioned policy calibrated per budget, its nested plans at ``budget``
        (:func:`rlskip.methods.budget_plans`: rounded down to the calibration grid; outside its range refused)."""
        if self.policy.budget_input:
            if budget is None:
                raise ValueError("this policy is budget-conditioned: pass budget=<FLOPs ratio in (0, 1]>")
            if not 0.0 < float(budget) <= 1.0:
                raise ValueError(f"budget must be a FLOPs ratio in (0, 1], got {budget}")
            if self.thresholds:
                return budget_plans(self.policy, self.space, self.thresholds, float(budget))
        elif budget is not None:
            raise ValueError("this policy was trained without a budget input; drop budget=")
        return policy_plans(self.policy, self.space, self.threshold, budget)

    # ---- decisions and outputs ------------------------------------------------------------------------
    def decide(self, inputs, budget: float | None = None, attention_mask: torch.Tensor | None = None) -> Plan:
        """The plans the policy picks for ``inputs`` (a text, a list of texts, or an ``input_ids`` tensor):
        keep where sigmoid(logit) >= threshold. ``budget``: for (and only for) a budget-conditioned policy."""
        return self.source(budget)(self.observe(inputs, attention_mask))[0]

    def run(self, inputs, budget: float | None = None, attention_mask: torch.Tensor | None = None, **gen_kwargs) -> Executed:
        """Decide and execute: the executor's outputs (predictions, FLOPs, the plans) for ``inputs``, in input
        order. Plan-aware: decided in pools of :data:`~rlskip.batching.POOL_BATCHES` batches, then executed in
        batches of agreeing plans; else each batch of ``batch_size`` consecutive inputs is decided and executed."""
        source = self.source(budget)
        rows = self.token_rows(inputs, attention_mask)
        if not rows:
            raise ValueError("no inputs were given")
        pool = self.batch_size * (POOL_BATCHES if self.plan_aware else 1)
        parts, plans = [], []
        for start in range(0, len(rows), pool):
            obs = self.executor.observe(rows[start : start + pool])
            plan, cost = source(obs)
            out = run_pool(self.executor, obs, plan, cost, self.batch_size, self.plan_aware, **gen_kwargs)
            parts.append((list(range(start, start + obs.batch_size)), out))
            plans.append(plan)
        return merge(len(rows), parts, plans[0] if len(plans) == 1 else concat_plans(plans))

    def generate(
        self, inputs, budget: float | None = None, return_details: bool = False, attention_mask: torch.Tensor | None = None,
        **gen_kwargs,
    ) -> list[str] | list[dict]:
        """Generate with each input's own plan.

        Args:
            inputs: a text, a list of texts, or an ``input_ids`` tensor.
            budget: FLOPs-ratio budget, for a budget-conditioned policy.
            return_details: return dicts ``{"text", "generation", "flops_ratio", "skipped"}`` instead of strings;
                ``flops_ratio`` is the analytic FLOPs with the policy (its own cost included) over the full
                model's at the same lengths, ``skipped`` the candidates the plan switched off.
            attention_mask: with an ``input_ids`` tensor.
            **gen_kwargs: generation options over the run's defaults (``max_new_tokens``, ``num_beams``, ...).
        """
        if self.kind != "generation":
            raise ValueError("this checkpoint is a classifier: use classify()")
        out = self.run(inputs, budget, attention_mask, **gen_kwargs)
        if not return_details:
            return out.predictions
        if isinstance(inputs, torch.Tensor):
            sources = self.tokenizer.batch_decode(inputs if inputs.dim() == 2 else inputs[None], skip_special_tokens=True)
        else:
            sources = [inputs] if isinstance(inputs, str) else list(inputs)
        return [
            {"text": s, "generation": g, "flops_ratio": r, "skipped": out.plan.skipped_names(i)}
            for i, (s, g, r) in enumerate(zip(sources, out.predictions, out.flops_ratio.tolist()))
        ]

    def classify(self, inputs, budget: float | None = None, attention_mask: torch.Tensor | None = None) -> list[int]:
        """Class ids for ``inputs`` (texts or input ids), each with its own plan (classification checkpoints)."""
        if self.kind != "classification":
            raise ValueError("this checkpoint is a generator: use generate()")
        return self.run(inputs, budget, attention_mask).predictions


def run_config(run_dir: Path):
    """The run's ``config.yaml``; a one-line error when it is missing or not a run config."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.yaml): {run_dir}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # a damaged YAML file: yaml and omegaconf raise many kinds
        raise ValueError(f"{path} is not a valid run config: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig) or "env" not in cfg or "eval" not in cfg:
        raise ValueError(f"{path} is not a run config (no env / eval sections)")
    return cfg


def run_env(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The run's ``env`` section on the current schema (keys added since the run took their defaults)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(OmegaConf.structured(EnvConfig), cfg.env)
    except OmegaConfBaseException as e:
        raise ValueError(f"{run_dir / 'config.yaml'} has an env section this rlskip cannot read: {str(e).splitlines()[0]}") from None


def _backbone_source(run_dir: Path, ref: dict, backbone: str | None) -> tuple[str, str]:
    """Where to load the generator and its tokenizer from: ``backbone=`` if given, else the reference; a run
    directory moved since training still finds its own ``generator/`` (or tuned ``generator-<hash>/``)."""
    if backbone is not None:
        folder = Path(backbone).expanduser()
        has_tokenizer = (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()
        return str(backbone), str(backbone) if has_tokenizer else ref.get("tokenizer") or ref["name_or_path"]
    def here(path: str) -> str:
        p = Path(path).expanduser()
        own = run_dir / p.name
        moved = not p.exists() and (p.name == "generator" or p.name.startswith("generator-")) and own.is_dir()
        return str(own) if moved else path

    return here(ref["name_or_path"]), here(ref.get("tokenizer") or ref["name_or_path"])


def load(
    path: str | Path, name: str = "last", backbone: str | None = None, threshold: float | None = None, batch_size: int = 16,
    plan_aware: bool = True,
) -> SkipModel:
    """Load checkpoint ``name`` of run directory ``path`` with its tokenizer and generator.

    Args:
        path: a run directory written by ``python -m rlskip.train``.
        name: checkpoint name: ``last`` (the final policy, with the threshold calibrated after training) or ``best`` (the best training-batch reward; decides at 0.5).
        backbone: a local model folder to use as the generator instead of the checkpoint's reference (its
            ``name_or_path``, a hub id or a folder). Its content hash must match the checkpoint's.
        threshold: keep where ``sigmoid(logit) >= threshold``, in (0, 1). Default: the threshold calibrated at
            the end of training when the checkpoint records one (``extra["threshold"]``), else 0.5.
        batch_size: the most instances per runtime call.
        plan_aware: batch instances whose plans agree (:mod:`rlskip.batching`); False: consecutive batches.

    Raises:
        FileNotFoundError: the run directory or the checkpoint is missing.
        ValueError: a truncated or corrupted checkpoint, or a backbone other than the one the policy was
            trained on (one line naming both).
    """
    run_dir = Path(path)
    cfg = run_config(run_dir)
    ckpt = load_checkpoint(run_dir, name)
    ref = ckpt.backbone_ref
    env_name = cfg.env.name
    kind = "classification" if env_name == "glue" else "generation"
    id2label = ref["config"].get("id2label") or {}
    model_src, tok_src = _backbone_source(run_dir, ref, backbone)
    revision = None if backbone is not None else ref.get("revision")
    head = "classifier" if kind == "classification" else "lm"
    model = load_backbone(model_src, head, len(id2label) or None, revision)
    try:
        verify_backbone(ckpt, model)
    except ValueError as e:
        raise ValueError(f"backbone {model_src} does not fit checkpoint {run_dir / name}: {e}") from None
    tokenizer = load_tokenizer(tok_src, revision)
    runtime = get_runtime(model)
    env = run_env(cfg, run_dir)
    if runtime.dims.max_positions is not None:
        env.max_source_tokens = min(env.max_source_tokens, runtime.dims.max_positions)
    thresholds = None
    if threshold is None:  # the calibrated ones: one, or one per budget for a budget-conditioned policy
        threshold = float(ckpt.extra.get("threshold", DEFAULT_THRESHOLD))
        thresholds = {float(b): float(t) for b, t in ckpt.extra.get("thresholds", {}).items()} or None
    encoder = encoder_for(tokenizer, runtime, env, bool(cfg.get("backbone", {}).get("chat", False)))
    executor = Executor(runtime, encoder, kind, generation_settings(cfg), env.label_words)
    return SkipModel(
        model, tokenizer, ckpt.build_policy(), runtime, ckpt, threshold, executor, batch_size, plan_aware, thresholds
    )


def read_texts(path: str | Path) -> list[str]:
    """Texts from a file: one per line, or JSON lines with a ``text`` or ``document`` field (blank lines skipped)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    texts: list[str] = []
    for n, line in enumerate(read_utf8_lines(path), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            text = row.get("text", row.get("document"))
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: a JSON line needs a 'text' or 'document' string field")
            texts.append(text)
        else:
            texts.append(line)
    if not texts:
        raise ValueError(f"input file {path} holds no text")
    return texts


__all__ = ["SkipModel", "load", "read_texts"]
