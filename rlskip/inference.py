"""Loading a trained skip policy for inference: ``rlskip.load(run_dir)`` -> :class:`SkipModel`.

::

    import rlskip
    m = rlskip.load("runs/<run>")                  # the final ("last") checkpoint, calibrated threshold, tokenizer and generator
    m.generate(["copy 1 2 3"])                     # -> ["1 2 3"], each instance with its own plan
    m.generate(texts, return_details=True)         # -> [{"text", "generation", "flops_ratio", "skipped"}, ...]
    m.decide(texts)                                # -> Plan (what would be skipped)

Decisions are deterministic: a candidate (or token) is kept where ``sigmoid(logit) >= threshold``; a higher
threshold skips more. The default threshold is the one calibrated at the end of training when the checkpoint
records it (``extra["threshold"]``), else 0.5. Default generation settings (``max_new_tokens``, ``num_beams``) and the source budget
(``max_source_tokens``) are the run's own, from its ``config.yaml``. The generator is checked against the
checkpoint (SkipSpace and content hash) before anything runs, so a policy is never applied to a backbone
it was not trained on.

This module imports neither gymnasium nor Stable-Baselines3: serving needs only torch and transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlskip.plan import Plan

DEFAULT_MAX_SOURCE_TOKENS = 1024
DEFAULT_THRESHOLD = 0.5


class SkipModel:
    """A generator with its skip policy: decides a plan per input, then runs the generator under it.

    Build it with :func:`load`. Attributes: ``model`` (the Hugging Face model), ``tokenizer``, ``policy``,
    ``runtime``, ``space``, ``threshold``, ``gen_kwargs`` (defaults for :meth:`generate`),
    ``max_source_tokens``, ``kind`` (``"generation"`` or ``"classification"``), ``checkpoint``.
    """

    def __init__(self, model, tokenizer, policy, runtime, checkpoint, threshold: float, gen_kwargs: dict, max_source_tokens: int, kind: str):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.model, self.tokenizer, self.policy, self.runtime = model, tokenizer, policy, runtime
        self.checkpoint, self.space = checkpoint, runtime.space
        self.threshold, self.gen_kwargs = float(threshold), dict(gen_kwargs)
        self.max_source_tokens, self.kind = int(max_source_tokens), kind

    # ---- inputs ---------------------------------------------------------------------------------------
    def encode(self, inputs, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` from texts (tokenised, cut to ``max_source_tokens``, right-padded)
        or from an ``input_ids`` tensor (``[batch, len]`` or ``[len]``; right-padded; the mask defaults to the
        non-pad positions)."""
        if isinstance(inputs, torch.Tensor):
            ids = inputs.long()
            if ids.dim() == 1:
                ids = ids[None]
            if attention_mask is None:
                attention_mask = ids != self.tokenizer.pad_token_id
            return ids, attention_mask.bool().view(ids.shape)
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts:
            raise ValueError("no inputs given")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"input {i} is empty or not a string: {t!r}")
        rows = self.tokenizer(texts, truncation=True, max_length=self.max_source_tokens)["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        return ids, torch.arange(width)[None, :] < lengths[:, None]

    def _budget(self, budget: float | None, batch: int) -> torch.Tensor | None:
        if self.policy.budget_input:
            if budget is None:
                raise ValueError("this policy is budget-conditioned: pass budget=<FLOPs ratio in (0, 1]>")
            if not 0.0 < float(budget) <= 1.0:
                raise ValueError(f"budget must be a FLOPs ratio in (0, 1], got {budget}")
            return torch.full((batch,), float(budget))
        if budget is not None:
            raise ValueError("this policy was trained without a budget input; drop budget=")
        return None

    def _plan(self, obs, budget: float | None) -> tuple[Plan, torch.Tensor]:
        from rlskip.agents.policy import observation_inputs

        b = self._budget(budget, obs.batch_size)
        bits, token_keep = self.policy.decide(**observation_inputs(obs), budget=b, threshold=self.threshold)
        cost = torch.tensor([self.policy.flops(int(n)) for n in obs.lengths], dtype=torch.float64)
        return Plan(self.space, bits, token_keep if self.space.token_dropping else None), cost

    # ---- decisions and outputs ------------------------------------------------------------------------
    @torch.no_grad()
    def decide(self, inputs, budget: float | None = None, attention_mask: torch.Tensor | None = None) -> Plan:
        """The plans the policy picks for ``inputs`` (texts or input ids): keep where sigmoid(logit) >= threshold.

        Args:
            inputs: a text, a list of texts, or an ``input_ids`` tensor.
            budget: FLOPs-ratio budget, required for (and only for) a budget-conditioned policy.
            attention_mask: with an ``input_ids`` tensor; defaults to its non-pad positions.
        """
        ids, mask = self.encode(inputs, attention_mask)
        return self._plan(self.runtime.observe(ids, mask), budget)[0]

    @torch.no_grad()
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
        ids, mask = self.encode(inputs, attention_mask)
        obs = self.runtime.observe(ids, mask)
        plan, cost = self._plan(obs, budget)
        out = self.runtime.generate(obs, plan, **{**self.gen_kwargs, **gen_kwargs})
        texts = [t.strip() for t in self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
        if not return_details:
            return texts
        ratios = ((out.flops + cost) / out.full_flops).tolist()
        sources = self.tokenizer.batch_decode(ids, skip_special_tokens=True) if isinstance(inputs, torch.Tensor) else (
            [inputs] if isinstance(inputs, str) else list(inputs)
        )
        return [
            {"text": s, "generation": g, "flops_ratio": r, "skipped": plan.skipped_names(i)}
            for i, (s, g, r) in enumerate(zip(sources, texts, ratios))
        ]

    @torch.no_grad()
    def classify(self, inputs, budget: float | None = None, attention_mask: torch.Tensor | None = None) -> list[int]:
        """Class ids for ``inputs`` (texts or input ids), each with its own plan (classification checkpoints)."""
        if self.kind != "classification":
            raise ValueError("this checkpoint is a generator: use generate()")
        ids, mask = self.encode(inputs, attention_mask)
        obs = self.runtime.observe(ids, mask)
        plan, _ = self._plan(obs, budget)
        logits, _, _, _ = self.runtime.classify(obs, plan)
        return logits.argmax(-1).tolist()


def _run_config(run_dir: Path):
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def _backbone_source(run_dir: Path, ref: dict, backbone: str | None) -> tuple[str, str]:
    """Where to load the generator and its tokenizer from: ``backbone=`` if given, else the reference; a run
    directory moved since training still finds its own ``generator/``."""
    own = run_dir / "generator"
    if backbone is not None:
        folder = Path(backbone).expanduser()
        has_tokenizer = (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()
        return str(backbone), str(backbone) if has_tokenizer else ref.get("tokenizer") or ref["name_or_path"]
    name, tok = ref["name_or_path"], ref.get("tokenizer") or ref["name_or_path"]
    if own.is_dir() and not Path(name).expanduser().exists() and Path(name).name == "generator":
        name = str(own)
        if Path(tok).name == "generator" and not Path(tok).expanduser().exists():
            tok = str(own)
    return name, tok


def load(path: str | Path, name: str = "last", backbone: str | None = None, threshold: float | None = None) -> SkipModel:
    """Load checkpoint ``name`` of run directory ``path`` with its tokenizer and generator.

    Args:
        path: a run directory written by ``python -m rlskip.train``.
        name: checkpoint name: ``last`` (the final policy, with the threshold calibrated after training) or ``best`` (the best training-batch reward; decides at 0.5).
        backbone: a local model folder to use as the generator instead of the checkpoint's reference (its
            ``name_or_path``, a hub id or a folder). Its content hash must match the checkpoint's.
        threshold: keep where ``sigmoid(logit) >= threshold``, in (0, 1). Default: the threshold calibrated at
            the end of training when the checkpoint records one (``extra["threshold"]``), else 0.5.

    Raises:
        FileNotFoundError: the run directory or the checkpoint is missing.
        ValueError: a truncated or corrupted checkpoint, or a backbone other than the one the policy was
            trained on (one line naming both).
    """
    from rlskip.backbone import load_backbone, load_tokenizer
    from rlskip.checkpoint import load_checkpoint, verify_backbone
    from rlskip.runtime import get_runtime

    run_dir = Path(path)
    ckpt = load_checkpoint(run_dir, name)
    cfg = _run_config(run_dir)
    ref = ckpt.backbone_ref
    env_name = cfg.env.name if cfg is not None else None
    kind = "classification" if env_name == "glue" else "generation"
    id2label = ref["config"].get("id2label") or {}
    model_src, tok_src = _backbone_source(run_dir, ref, backbone)
    revision = None if backbone is not None else ref.get("revision")
    model = load_backbone(model_src, kind, len(id2label) or None, revision).eval()
    try:
        verify_backbone(ckpt, model)
    except ValueError as e:
        raise ValueError(f"backbone {model_src} does not fit checkpoint {run_dir / name}: {e}") from None
    tokenizer = load_tokenizer(tok_src, revision)
    gen_kwargs, max_source = {}, DEFAULT_MAX_SOURCE_TOKENS
    if cfg is not None and "env" in cfg:
        from rlskip.train import gen_kwargs as run_gen_kwargs

        gen_kwargs = run_gen_kwargs(cfg)
        max_source = int(cfg.env.max_source_tokens)
    max_source = min(max_source, int(getattr(model.config, "max_position_embeddings", max_source)))
    if threshold is None:
        threshold = float(ckpt.extra.get("threshold", DEFAULT_THRESHOLD))
    return SkipModel(model, tokenizer, ckpt.build_policy(), get_runtime(model), ckpt, threshold, gen_kwargs, max_source, kind)


def read_texts(path: str | Path) -> list[str]:
    """Texts from a file: one per line, or JSON lines with a ``text`` or ``document`` field (blank lines skipped)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    texts: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
