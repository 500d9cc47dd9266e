"""``python -m rlskip.generate ckpt=<run dir> text="..." | input=<file> [output=<file>] [key=value ...]``

Generates with a trained skip policy, each input with its own plan. Keys (Hydra overrides; schema
:class:`rlskip.config.GenerateConfig`):

- ``ckpt`` (required): the run directory; ``name`` the checkpoint (default ``last``);
- ``text``: one input; or ``input``: a file with one text per line, or JSON lines with a ``text`` or
  ``document`` field;
- ``output``: write JSON lines ``{"text", "generation", "flops_ratio"}`` there (atomically) instead of printing;
- ``backbone``: a local generator folder instead of the checkpoint's reference; ``threshold`` (default: the checkpoint's calibrated one, else 0.5);
  ``budget`` (budget-conditioned policies); ``max_new_tokens``, ``num_beams`` (default: the run's);
  ``batch_size`` (default 16; inputs are batched by plan, ``plan_aware=false`` for consecutive batches).

Printed otherwise: one line per input, the generation and its FLOPs ratio (policy included) to the full model.
Every error is one line on stderr starting with ``error:`` and exit code 2.
"""

from __future__ import annotations

import json
import sys

from rlskip.config import compose, quote_value


def run(cfg) -> list[dict]:
    from rlskip.inference import load, read_texts

    if (cfg.text is None) == (cfg.input is None):
        raise ValueError("give exactly one of text=... or input=<file>")
    texts = [cfg.text] if cfg.text is not None else read_texts(cfg.input)
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    gen = {k: int(cfg[k]) for k in ("max_new_tokens", "num_beams") if cfg[k] is not None}
    model = load(
        cfg.ckpt, name=cfg.name, backbone=cfg.backbone, threshold=cfg.threshold, batch_size=cfg.batch_size,
        plan_aware=cfg.plan_aware,
    )
    rows = model.generate(texts, budget=cfg.budget, return_details=True, **gen)
    return [{"text": r["text"], "generation": r["generation"], "flops_ratio": r["flops_ratio"]} for r in rows]


def overrides(argv: list[str]) -> list[str]:
    """The command line as Hydra overrides: a text is free prose, quoted so that Hydra's override grammar does not
    read its commas or brackets."""
    return [quote_value(a) if a.startswith("text=") else a for a in argv]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(overrides(argv), "generate")
        rows = run(cfg)
        if cfg.output is not None:
            from pathlib import Path

            from rlskip.checkpoint import atomic_write_text

            out = Path(cfg.output)
            if not out.parent.is_dir():
                raise FileNotFoundError(f"output directory not found: {out.parent}")
            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        else:
            for r in rows:
                print(f"{r['generation']}\t[flops ratio {r['flops_ratio']:.3f}]")
    except (ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
