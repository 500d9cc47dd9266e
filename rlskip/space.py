"""SkipSpace: the ordered skippable units of one backbone, and the bit <-> name map a policy acts on.

A *candidate* is one sub-layer that a plan may switch off. Names are ``<stack>.<layer>.<part>`` for
encoder-decoder models (``enc.3.ffn``, ``dec.0.cross_attn``) and ``<layer>.<part>`` for single-stack models
(decoder-only and encoder-only: ``4.attn``, ``4.ffn``). Candidate kinds are

- encoder-decoder models: ``enc_attn``, ``enc_ffn``, ``dec_self_attn``, ``dec_cross_attn``, ``dec_ffn``;
- decoder-only and encoder-only models: ``attn``, ``ffn``.

Some candidates are *fixed on* and get no bit: the whole first layer of the stack that reads the input
(the encoder's, or a single stack's): its output is what the policy reads, so it must run before any
decision is made. The bits of a plan are, in order, the remaining *skippable* candidates. Input tokens are
the separate *token* candidate: a per-position keep mask, applied after that first layer, that never drops
special (or prompt-template) tokens.

A SkipSpace is saved as JSON with every checkpoint, so a policy is never applied to a backbone whose layout
differs from the one it was trained on (:meth:`SkipSpace.check_compatible`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ENCODER_DECODER_KINDS = ("enc_attn", "enc_ffn", "dec_self_attn", "dec_cross_attn", "dec_ffn")
SINGLE_STACK_KINDS = ("attn", "ffn")

# kind -> (stack prefix, sub-layer name used in candidate names)
_KIND_PARTS = {
    "enc_attn": ("enc", "attn"),
    "enc_ffn": ("enc", "ffn"),
    "dec_self_attn": ("dec", "self_attn"),
    "dec_cross_attn": ("dec", "cross_attn"),
    "dec_ffn": ("dec", "ffn"),
    "attn": (None, "attn"),
    "ffn": (None, "ffn"),
}


@dataclass(frozen=True)
class Candidate:
    """One skippable sub-layer: its kind, layer index and unique name."""

    kind: str
    layer: int

    @property
    def name(self) -> str:
        stack, part = _KIND_PARTS[self.kind]
        return f"{self.layer}.{part}" if stack is None else f"{stack}.{self.layer}.{part}"


class SkipSpace:
    """The candidates of one backbone layout.

    Args:
        family: model family the layout belongs to (``"bart"``, ...); part of equality.
        candidates: every sub-layer candidate in execution order, fixed ones included.
        fixed: names of candidates that always run and therefore have no bit.
        token_dropping: whether plans may carry a token keep-mask.
    """

    def __init__(
        self,
        family: str,
        candidates: tuple[Candidate, ...] | list[Candidate],
        fixed: tuple[str, ...] | list[str] = (),
        token_dropping: bool = True,
    ) -> None:
        self.family = family
        self.candidates = tuple(candidates)
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"SkipSpace candidates must have unique names, got {names}")
        unknown = set(fixed) - set(names)
        if unknown:
            raise ValueError(f"fixed candidates {sorted(unknown)} are not in the SkipSpace")
        self.fixed = tuple(n for n in names if n in set(fixed))
        self.token_dropping = bool(token_dropping)
        self.skippable = tuple(c for c in self.candidates if c.name not in set(self.fixed))
        self._bit_of = {c.name: i for i, c in enumerate(self.skippable)}

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def encoder_decoder(cls, family: str, encoder_layers: int, decoder_layers: int) -> "SkipSpace":
        """Layout of an encoder-decoder model; the first encoder layer is fixed on."""
        cands = [Candidate(k, i) for i in range(encoder_layers) for k in ("enc_attn", "enc_ffn")]
        cands += [
            Candidate(k, i) for i in range(decoder_layers) for k in ("dec_self_attn", "dec_cross_attn", "dec_ffn")
        ]
        return cls(family, cands, fixed=("enc.0.attn", "enc.0.ffn"), token_dropping=True)

    @classmethod
    def single_stack(cls, family: str, layers: int, token_dropping: bool = False) -> "SkipSpace":
        """Layout of a decoder-only or encoder-only model; the first layer is fixed on."""
        cands = [Candidate(k, i) for i in range(layers) for k in SINGLE_STACK_KINDS]
        return cls(family, cands, fixed=("0.attn", "0.ffn"), token_dropping=token_dropping)

    # -- the bit map --------------------------------------------------------------------------------
    @property
    def n_bits(self) -> int:
        """Number of plan bits: one per skippable candidate."""
        return len(self.skippable)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the skippable candidates, in bit order."""
        return tuple(c.name for c in self.skippable)

    def bit(self, name: str) -> int:
        """Bit index of a skippable candidate."""
        if name not in self._bit_of:
            if name in self.fixed:
                raise ValueError(f"candidate {name!r} is fixed on and has no bit")
            raise ValueError(f"unknown candidate {name!r}; expected one of {list(self.names)}")
        return self._bit_of[name]

    def name(self, bit: int) -> str:
        """Name of the candidate behind a bit."""
        if not 0 <= bit < self.n_bits:
            raise ValueError(f"bit {bit} out of range for a SkipSpace of {self.n_bits} bits")
        return self.skippable[bit].name

    def skipped_names(self, bits) -> list[str]:
        """Names of the candidates one plan's bool tensor of sub-layer ``bits [n_bits]`` skips, in bit order."""
        return [self.name(j) for j in (~bits).nonzero().flatten().tolist()]

    def bits_of_kind(self, kind: str) -> list[int]:
        """Bit indices of every skippable candidate of one kind, in layer order."""
        return [i for i, c in enumerate(self.skippable) if c.kind == kind]

    @property
    def step_bits(self) -> list[int]:
        """Bit indices of the sub-layers that run at every decoding step: an encoder-decoder model's decoder
        candidates; every bit of a single stack (a decoder-only model runs all of them at each step, and an
        encoder-only one, with no steps, is grouped by its whole plan)."""
        decoder = [i for i, c in enumerate(self.skippable) if c.kind.startswith("dec_")]
        return decoder or list(range(self.n_bits))

    def describe(self) -> str:
        n_enc = sum(1 for c in self.candidates if c.kind == "enc_attn")
        n_dec = sum(1 for c in self.candidates if c.kind == "dec_ffn")
        n_one = sum(1 for c in self.candidates if c.kind == "attn")
        layout = f"{n_enc} encoder + {n_dec} decoder layers" if n_enc or n_dec else f"{n_one} layers"
        return f"{self.family} SkipSpace ({layout}, {self.n_bits} bits)"

    # -- equality and (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "candidates": [{"kind": c.kind, "layer": c.layer} for c in self.candidates],
            "fixed": list(self.fixed),
            "token_dropping": self.token_dropping,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SkipSpace":
        try:
            cands = [Candidate(str(c["kind"]), int(c["layer"])) for c in d["candidates"]]
            for c in cands:
                if c.kind not in _KIND_PARTS:
                    raise ValueError(f"unknown candidate kind {c.kind!r}")
            return cls(str(d["family"]), cands, fixed=tuple(d["fixed"]), token_dropping=bool(d["token_dropping"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a SkipSpace description: missing or malformed field {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SkipSpace":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"SkipSpace JSON is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "SkipSpace":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"SkipSpace file not found: {p}")
        return cls.from_json(p.read_text())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkipSpace) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    def check_compatible(self, other: "SkipSpace", what: str = "plan") -> None:
        """Raise a ValueError naming both layouts unless ``other`` equals this space."""
        if other != self:
            raise ValueError(f"{what} was made for a {other.describe()}, but this backbone has a {self.describe()}")
