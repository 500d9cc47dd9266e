"""Checkpoint I/O for a run directory: policy weights, the SkipSpace, and what the policy was trained on.

A run directory holds, per checkpoint ``<name>`` (``last``, ``best``, ...)::

    skip_space.json                      the backbone layout (one per run directory)
    <name>-<sha256[:16]>.safetensors     the policy weights, named by their content
    <name>.json                          metadata: weights file and its sha256, policy constructor kwargs,
                                         backbone reference, training step, free-form extras

Every file is written atomically (temp file in the same directory, fsync, ``os.replace``), so a crash never
leaves a truncated file under a final name. A checkpoint spans two files, so the metadata file is the
commit point: the weights go to a new, content-named file first, and only then does ``<name>.json`` switch
to it. A crash at any moment leaves the previous ``<name>.json`` pointing at the previous weights, which
are removed only after the switch. Loading re-checks the weights' sha256, so a file damaged on disk is
reported as such instead of loading garbage.

The backbone reference identifies the model by a content hash of its weights (:func:`backbone_hash`)
rather than by a hub revision alone: a generator tuned jointly with the policy, or loaded from a local
path, has no revision that names its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from rlskip.policy import SkipPolicy
from rlskip.runtime import get_runtime
from rlskip.space import SkipSpace

SPACE_FILE = "skip_space.json"
FORMAT_VERSION = 1
_BACKBONE_FIELDS = ("name_or_path", "content_hash", "family", "config")
_META_FIELDS = ("format_version", "weights", "weights_sha256", "policy_kwargs", "backbone", "step", "extra")
# mkstemp creates files readable by the owner only; final files get the usual umask-derived mode instead
_UMASK = os.umask(0)
os.umask(_UMASK)


# -- atomic writes ------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The bytes go to a temp file in the same directory (``os.replace`` is atomic only within one file
    system), are fsynced, and replace ``path``; the directory is fsynced too so the rename survives a power
    loss. On any error the temp file is removed and ``path`` is untouched.

    Args:
        path: the final file name; its directory must exist.
        data: the complete file content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` for text.

    Args:
        path: the final file name; its directory must exist.
        text: the complete file content.
        encoding: text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_dir(directory: Path) -> None:
    # Directories cannot be opened for fsync on every platform (e.g. Windows); the rename is still atomic.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- backbone identity --------------------------------------------------------------------------------
def backbone_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict: every entry's name, dtype, shape and raw bytes, in name order.

    Raw bytes are hashed without conversion (a zero-copy byte view for CPU tensors): bart-base's 560 MB
    take under a second on one CPU core.

    Args:
        model: the backbone (any ``nn.Module``).
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def make_backbone_ref(
    model: torch.nn.Module, family: str, name_or_path: str | None = None, revision: str | None = None
) -> dict:
    """The backbone reference :func:`save_checkpoint` records.

    Args:
        model: the backbone, with a Hugging Face ``config``.
        family: runtime family (``SkipSpace.family``, e.g. ``"bart"``).
        name_or_path: hub id or local path to load it from; defaults to ``model.config.name_or_path``.
        revision: hub revision it was loaded at, if any (recorded for people; the hash is what is checked).
    """
    cfg = model.config
    ref = {
        "name_or_path": name_or_path if name_or_path is not None else getattr(cfg, "name_or_path", ""),
        "content_hash": backbone_hash(model),
        "family": family,
        "config": json.loads(cfg.to_json_string(use_diff=False)),
    }
    if revision is not None:
        ref["revision"] = revision
    return ref


# -- save -------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        policy_state: the policy's state dict.
        policy_kwargs: :class:`SkipPolicy` constructor kwargs.
        space: the backbone's SkipSpace.
        backbone_ref: see :func:`make_backbone_ref`.
        step: training step at which it was saved.
        extra: free-form metrics and state (e.g. the constraint handler's state dict).
    """

    policy_state: dict[str, torch.Tensor]
    policy_kwargs: dict
    space: SkipSpace
    backbone_ref: dict
    step: int
    extra: dict = field(default_factory=dict)

    def build_policy(self) -> SkipPolicy:
        """The policy rebuilt from its kwargs with the saved weights, in eval mode."""
        try:
            policy = SkipPolicy(**self.policy_kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint policy_kwargs {self.policy_kwargs} do not build a SkipPolicy: {e}") from None
        try:
            policy.load_state_dict(self.policy_state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ValueError(f"checkpoint weights do not fit SkipPolicy({self.policy_kwargs}): {first}") from None
        return policy.eval()


_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _weights_re(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}-[0-9a-f]{{16}}\.safetensors$")


def save_checkpoint(
    run_dir: str | Path,
    policy: SkipPolicy,
    space: SkipSpace,
    backbone_ref: dict,
    step: int,
    extra: dict | None = None,
    name: str = "last",
) -> Path:
    """Save a policy checkpoint into ``run_dir`` (created if missing); returns the metadata file's path.

    Everything is validated before the first byte is written, so a bad argument leaves the run directory
    as it was.

    Args:
        run_dir: the run directory.
        policy: the policy; its ``init_kwargs`` are saved so :func:`load_policy` can rebuild it.
        space: the backbone's SkipSpace; must match ``policy.n_bits`` and any SkipSpace already in ``run_dir``.
        backbone_ref: from :func:`make_backbone_ref`; needs ``name_or_path``, ``content_hash``, ``family``,
            ``config``.
        step: training step.
        extra: JSON-serialisable metrics or state to keep with the checkpoint.
        name: checkpoint name (letters, digits, ``_ . -``); saving under an existing name replaces it.
    """
    run_dir = Path(run_dir)
    if not _NAME_RE.match(name) or f"{name}.json" == SPACE_FILE:
        raise ValueError(
            f"checkpoint name must use only letters, digits, '_', '.', '-' and not be {SPACE_FILE[:-5]!r}, got {name!r}"
        )
    if policy.n_bits != space.n_bits:
        raise ValueError(f"policy has {policy.n_bits} bits but the {space.describe()} has {space.n_bits}")
    missing = [k for k in _BACKBONE_FIELDS if k not in backbone_ref]
    if missing:
        raise ValueError(f"backbone_ref lacks {missing}; build it with rlskip.checkpoint.make_backbone_ref")
    space_path = run_dir / SPACE_FILE
    if space_path.is_file():
        old = _read_space(space_path)
        if old != space:
            raise ValueError(
                f"{run_dir} holds checkpoints for a {old.describe()}, not a {space.describe()}; "
                "use another run directory"
            )
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise ValueError(f"refusing to write checkpoint {name!r}: the policy's weights are not finite")
    weights = safetensors.torch.save(state)
    sha = hashlib.sha256(weights).hexdigest()
    weights_name = f"{name}-{sha[:16]}.safetensors"
    meta = {
        "format_version": FORMAT_VERSION,
        "weights": weights_name,
        "weights_sha256": sha,
        "policy_kwargs": policy.init_kwargs,
        "backbone": backbone_ref,
        "step": int(step),
        "extra": extra or {},
    }
    try:
        meta_text = json.dumps(meta, indent=1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable (check extra / backbone_ref): {e}") from None

    run_dir.mkdir(parents=True, exist_ok=True)
    if not space_path.is_file():
        atomic_write_text(space_path, space.to_json())
    atomic_write_bytes(run_dir / weights_name, weights)
    meta_path = run_dir / f"{name}.json"
    atomic_write_text(meta_path, meta_text)  # the commit point: from here on the checkpoint is the new one
    pattern = _weights_re(name)
    for p in run_dir.iterdir():
        if pattern.match(p.name) and p.name != weights_name:
            p.unlink(missing_ok=True)
    return meta_path


# -- load -------------------------------------------------------------------------------------------
def _read_space(path: Path) -> SkipSpace:
    try:
        return SkipSpace.from_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is truncated or corrupted: {e}") from None


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is truncated or corrupted: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is corrupted: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in _META_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"{path} is corrupted or not an rlskip checkpoint: missing field(s) {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {meta['format_version']}; this rlskip reads {FORMAT_VERSION}")
    # the weights file must be this checkpoint's own: never follow a name out of the run directory
    if not isinstance(meta["weights"], str) or not _weights_re(path.stem).match(meta["weights"]):
        raise ValueError(
            f"{path} is corrupted: weights file name {meta['weights']!r} is not {path.stem}-<hash>.safetensors"
        )
    backbone = meta["backbone"]
    missing = [k for k in _BACKBONE_FIELDS if not isinstance(backbone, dict) or k not in backbone]
    if missing:
        raise ValueError(f"{path} is corrupted: backbone reference lacks {missing}")
    return meta


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Names of the checkpoints in ``run_dir`` (those with a ``<name>.json`` metadata file), sorted.

    Args:
        run_dir: the run directory.
    """
    run_dir = Path(run_dir)
    return sorted(p.stem for p in run_dir.glob("*.json") if p.name != SPACE_FILE and _NAME_RE.match(p.stem))


def load_checkpoint(run_dir: str | Path, name: str = "last") -> Checkpoint:
    """Load checkpoint ``name`` from ``run_dir``.

    Args:
        run_dir: the run directory.
        name: checkpoint name.

    Raises:
        FileNotFoundError: the run directory, the checkpoint or one of its files is missing.
        ValueError: a file is truncated or corrupted, or its weights do not match the recorded sha256.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    meta_path = run_dir / f"{name}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {name!r} not found in {run_dir} (no {meta_path.name}); available: {list_checkpoints(run_dir)}"
        )
    meta = _read_meta(meta_path)
    space_path = run_dir / SPACE_FILE
    if not space_path.is_file():
        raise FileNotFoundError(f"SkipSpace file missing from the run directory: {space_path}")
    space = _read_space(space_path)
    weights_path = run_dir / meta["weights"]
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint weights file missing: {weights_path} (named in {meta_path})")
    data = weights_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{weights_path} is truncated or corrupted: its sha256 differs from the one in {meta_path}")
    try:
        state = safetensors.torch.load(data)
    except safetensors.SafetensorError as e:
        raise ValueError(f"{weights_path} is truncated or corrupted: {e}") from None
    return Checkpoint(
        policy_state=state,
        policy_kwargs=dict(meta["policy_kwargs"]),
        space=space,
        backbone_ref=dict(meta["backbone"]),
        step=int(meta["step"]),
        extra=dict(meta["extra"]),
    )


def load_policy(run_dir: str | Path, name: str = "last") -> SkipPolicy:
    """The policy of checkpoint ``name`` in ``run_dir``, rebuilt and in eval mode.

    Args:
        run_dir: the run directory.
        name: checkpoint name.
    """
    return load_checkpoint(run_dir, name).build_policy()


def verify_backbone(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Raise a one-line ValueError unless ``model`` is the backbone ``ckpt`` was trained on.

    The SkipSpace is compared first (a different layout is the clearer message), then the content hash.

    Args:
        ckpt: a loaded checkpoint.
        model: the backbone to apply the policy to.
    """
    get_runtime(model).space.check_compatible(ckpt.space, what="checkpoint")
    want = ckpt.backbone_ref["content_hash"]
    got = backbone_hash(model)
    if got != want:
        raise ValueError(
            f"checkpoint was trained on backbone {ckpt.backbone_ref.get('name_or_path') or '<unnamed>'} "
            f"(hash {want[:16]}), but the given model has hash {got[:16]}; "
            "pass backbone=<path> to point at the right one"
        )
