"""``python -m rlskip.generate ckpt=<run dir> text="..." | input=<file> [output=<file>] [key=value ...]``

Generates with a trained skip policy, each input with its own plan. Keys:

- ``ckpt`` (required): the run directory; ``name`` the checkpoint (default ``last``);
- ``text``: one input; or ``input``: a file with one text per line, or JSON lines with a ``text`` or
  ``document`` field;
- ``output``: write JSON lines ``{"text", "generation", "flops_ratio"}`` there (atomically) instead of printing;
- ``backbone``: a local generator folder instead of the checkpoint's reference; ``threshold`` (default: the checkpoint's calibrated one, else 0.5);
  ``budget`` (budget-conditioned policies); ``max_new_tokens``, ``num_beams`` (default: the run's);
  ``batch_size`` (default 16).

Printed otherwise: one line per input, the generation and its FLOPs ratio (policy included) to the full model.
Every error is one line on stderr starting with ``error:`` and exit code 2.
"""

from __future__ import annotations

import json
import sys

KEYS = ("ckpt", "name", "text", "input", "output", "backbone", "threshold", "budget", "max_new_tokens", "num_beams", "batch_size")


def parse_args(argv: list[str], keys: tuple[str, ...], required: tuple[str, ...] = ("ckpt",)) -> dict[str, str]:
    """``key=value`` arguments, checked against ``keys``; a one-line ValueError for anything else."""
    args: dict[str, str] = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {a!r}; keys: {', '.join(keys)}")
        if key not in keys:
            raise ValueError(f"unknown key {key!r}; keys: {', '.join(keys)}")
        args[key] = value
    missing = [k for k in required if k not in args]
    if missing:
        raise ValueError(f"missing {', '.join(f'{k}=' for k in missing)}")
    return args


def number(args: dict, key: str, cast, default=None):
    if key not in args:
        return default
    try:
        return cast(args[key])
    except ValueError:
        raise ValueError(f"{key} must be a {cast.__name__}, got {args[key]!r}") from None


def run(args: dict[str, str]) -> list[dict]:
    from rlskip.inference import load, read_texts

    if ("text" in args) == ("input" in args):
        raise ValueError("give exactly one of text=... or input=<file>")
    texts = [args["text"]] if "text" in args else read_texts(args["input"])
    threshold = number(args, "threshold", float)
    budget = number(args, "budget", float)
    batch = number(args, "batch_size", int, 16)
    if batch < 1:
        raise ValueError(f"batch_size must be positive, got {batch}")
    gen = {k: number(args, k, int) for k in ("max_new_tokens", "num_beams") if k in args}
    model = load(args["ckpt"], name=args.get("name", "last"), backbone=args.get("backbone"), threshold=threshold)
    rows: list[dict] = []
    for i in range(0, len(texts), batch):
        rows += model.generate(texts[i : i + batch], budget=budget, return_details=True, **gen)
    return [{"text": r["text"], "generation": r["generation"], "flops_ratio": r["flops_ratio"]} for r in rows]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv, KEYS)
        rows = run(args)
        if "output" in args:
            from pathlib import Path

            from rlskip.checkpoint import atomic_write_text

            out = Path(args["output"])
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
