"""``synthetic``: the embedded default task. Procedurally generated seq2seq instances, no download.

Each instance is one operation on a list of digits, written as whitespace-separated tokens with the
operation word first::

    copy 3 9 1 4          -> 3 9 1 4
    reverse 3 9 1 4       -> 4 1 9 3
    sort 3 9 1 4          -> 1 3 4 9
    add 7 5 2 9 1 0       -> 2 2 2        (127 + 95 = 222: column pairs (7, 5) (2, 9) (1, 0))

Difficulty spreads widely across operations and lengths: ``copy`` is position-to-position attention,
``reverse`` needs the source length, ``sort`` needs counting, ``add`` needs digit alignment and a carry
chain. ``add`` writes the two numbers as the columns of a written addition, **least-significant column
first**: pairs ``a_0 b_0 a_1 b_1 ...`` of two numbers with as many digits each, and the sum least significant
digit first. Output digit ``i`` then reads one fixed pair of source positions and the carry, which follows
from the previous pair and the digit the decoder has just written. Most-significant-first would need the
whole carry chain before the first digit; "a + b" written apart needs a two-hop alignment.

``add`` is **not in the default mix**: the embedded demo's small BART does not learn it within the demo's
warm-up (docs/experiments.md). It stays available (``ops=[..., "add"]``) for longer runs.

Operand lengths are drawn uniformly from ``[min_len, max_len]``; for ``add`` the length counts the digits of
both numbers (two ``length // 2``-digit numbers). Instances are reproducible from ``seed``; the three
splits use different seeds and are also disjoint by construction: a stable hash of the source assigns
every possible instance to exactly one split, and each split keeps only its own.

The task has its own small vocabulary; :func:`synthetic_tokenizer` returns it as a Hugging Face fast
tokenizer with BART's special-token ids, and :func:`small_bart_config` the BART used by the embedded demo.
"""

from __future__ import annotations

import random
import zlib

from rlskip.envs.tasks.base import Example, Task, register

OPS = ("copy", "reverse", "sort", "add")
DEFAULT_OPS = ("copy", "reverse", "sort")  # what trains to >= 98% within the demo's budget (see above)
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in BART
VOCAB = SPECIALS + OPS + tuple(str(d) for d in range(10))
SPLITS = ("train", "validation", "test")
# hash(source) % 16 -> split: 14 of 16 buckets for training, one each for validation and test
_BUCKETS = {"train": range(0, 14), "validation": range(14, 15), "test": range(15, 16)}


def _digits(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10) for _ in range(n)]


def make_instance(op: str, length: int, rng: random.Random) -> tuple[str, str]:
    """``(source, target)`` of one instance of ``op`` with ``length`` operand digits."""
    if op == "add":
        k = length // 2  # two k-digit numbers (no leading zero), column pairs, least significant first
        a = _digits(rng, k - 1) + [rng.randrange(1, 10)]
        b = _digits(rng, k - 1) + [rng.randrange(1, 10)]
        total = sum((x + y) * 10**i for i, (x, y) in enumerate(zip(a, b)))
        src = [d for pair in zip(a, b) for d in pair]
        tgt = [int(c) for c in str(total)[::-1]]
    else:
        src = _digits(rng, length)
        tgt = {"copy": src, "reverse": src[::-1], "sort": sorted(src)}[op]
    return " ".join([op] + [str(t) for t in src]), " ".join(str(t) for t in tgt)


def _split_of(source: str) -> str:
    bucket = zlib.crc32(source.encode()) % 16
    return next(s for s, r in _BUCKETS.items() if bucket in r)


@register("synthetic")
class SyntheticTask(Task):
    """Procedurally generated copy / reverse / sort / add instances.

    Args:
        seed: base seed; each split derives its own, so the same seed gives identical instances.
        n_train: number of training instances.
        n_eval: number of validation and of test instances.
        ops: operations in the mix (subset of ``copy``, ``reverse``, ``sort``, ``add``; default without ``add``).
        weights: relative frequency of each op (default: uniform); harder ops may need more.
        min_len: shortest operand length (digits), at least 2 so that ``add`` has two numbers.
        max_len: longest operand length (digits).
    """

    name = "synthetic"
    kind = "generation"
    metric = "exact_match"

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 20000,
        n_eval: int = 500,
        ops: tuple[str, ...] | list[str] = DEFAULT_OPS,
        weights: tuple[float, ...] | list[float] | None = None,
        min_len: int = 4,
        max_len: int = 24,
    ) -> None:
        ops = tuple(ops)
        unknown = [o for o in ops if o not in OPS]
        if not ops or unknown:
            raise ValueError(f"synthetic ops must be a non-empty subset of {list(OPS)}, got {list(ops)}")
        if weights is not None and (len(weights) != len(ops) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"synthetic weights must be {len(ops)} non-negative numbers with a positive sum, got {weights}")
        if not 2 <= min_len <= max_len:
            raise ValueError(f"synthetic lengths need 2 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if n_train < 0 or n_eval < 0:
            raise ValueError(f"synthetic sizes must be >= 0, got n_train={n_train}, n_eval={n_eval}")
        self.seed, self.ops, self.min_len, self.max_len = int(seed), ops, int(min_len), int(max_len)
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(ops)
        self.sizes = {"train": int(n_train), "validation": int(n_eval), "test": int(n_eval)}

    def load(self, split: str | None = None, data_files=None, limit: int | None = None) -> list[Example]:
        split = split or "train"
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for the synthetic task; expected one of {list(SPLITS)}")
        if data_files is not None:
            raise ValueError("the synthetic task is generated, it reads no data files (data_files must be None)")
        n = self.sizes[split] if limit is None else min(int(limit), self.sizes[split])
        rng = random.Random(f"synthetic/{self.seed}/{split}")
        out: list[Example] = []
        while len(out) < n:
            op = rng.choices(self.ops, weights=self.weights)[0]
            length = rng.randint(self.min_len, self.max_len)
            src, tgt = make_instance(op, length, rng)
            if _split_of(src) != split:
                continue
            meta = {"length": len(src.split()) - 1}
            out.append(Example(id=f"{split}-{len(out)}", source=src, targets=(tgt,), group=op, meta=meta))
        return out

    def score(self, predictions: list[str], examples: list[Example]) -> list[float]:
        """Exact match after whitespace normalisation: 1.0 if the prediction equals any target, else 0.0."""
        if len(predictions) != len(examples):
            raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
        norm = lambda s: " ".join(str(s).split())  # noqa: E731
        return [float(any(norm(p) == norm(t) for t in ex.targets)) for p, ex in zip(predictions, examples)]


def synthetic_tokenizer():
    """The task's word-level fast tokenizer, with BART's special ids and ``<s> ... </s>`` wrapping."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=64,
    )


def small_bart_config(vocab_size: int = len(VOCAB), **overrides):
    """The small BART of the embedded default, sized so that it learns the task in minutes on 2 CPU cores.

    360k parameters (d_model 64, 3 + 3 layers, 4 heads, FFN 256); the warm-up recipe is
    ``configs/backbone/synthetic_small.yaml``.

    Keyword overrides replace any field (e.g. ``d_model=32`` for tests).
    """
    from transformers import BartConfig

    cfg = dict(
        vocab_size=vocab_size, d_model=64, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        forced_bos_token_id=None, scale_embedding=False,
    )
    cfg.update(overrides)
    return BartConfig(**cfg)
