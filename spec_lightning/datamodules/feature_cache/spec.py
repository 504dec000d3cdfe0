"""What a feature cache is made of (:class:`CacheSpec`), where it lives by default, and the checks a reader runs
against the manifest (each mismatch named with the file and both values)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from spec_lightning.datamodules.feature_cache.format import (
    MANIFEST_FILE,
    PLAN_FILE,
    POSITIONS,
    FeatureCacheError,
    storage_dtype,
)


@dataclass
class CacheSpec:
    """Everything that decides a cache's content: the writer's input and what a reader expects.

    Args:
        target: target source (as ``model.init_args.target``).
        target_dtype: dtype the target runs in while writing (as ``model.init_args.target_dtype``).
        aux_layers: ``"default"`` (SPEC §3.1 ``[1, N//2-1, N-4]``), ``"none"`` (final hidden state only) or layer ids.
        data, max_length, long_samples, on_bad_sample, val_fraction, seed, max_train_samples, max_val_samples: the
            ChatDataModule settings (the cache holds exactly that module's train and validation splits).
        storage_dtype: ``bfloat16`` (default), ``float32`` or ``float8_e4m3fn`` (aux features in fp8 with a per-token
            scale, the final hidden state in bf16).
        positions: ``loss`` (only positions some loss can read; see ``format``) or ``all``.
        max_medusa_heads: with ``positions: loss``, final hidden states are kept for Medusa modules of up to this
            many heads.
    """

    target: str
    data: str | list[str]
    target_dtype: str = "float32"
    aux_layers: str | list[int] = "default"
    max_length: int = 512
    long_samples: str = "truncate"
    on_bad_sample: str = "skip"
    val_fraction: float = 0.05
    seed: int = 0
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    storage_dtype: str = "bfloat16"
    positions: str = "loss"
    max_medusa_heads: int = 5

    def __post_init__(self) -> None:
        storage_dtype(self.storage_dtype)
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {self.positions!r}")
        if self.max_medusa_heads < 0:
            raise ValueError(f"max_medusa_heads must be >= 0, got {self.max_medusa_heads}")
        if isinstance(self.aux_layers, str) and self.aux_layers not in ("default", "none"):
            raise ValueError(f"aux_layers must be 'default', 'none' or a list of layer ids, got {self.aux_layers!r}")
        if not isinstance(self.aux_layers, str):
            self.aux_layers = [int(i) for i in self.aux_layers]
        if not isinstance(self.data, str):
            self.data = [str(d) for d in self.data]

    def resolve_aux(self, num_layers: int) -> list[int]:
        from spec_lightning.targets import default_aux_layer_ids

        if self.aux_layers == "none":
            return []
        if self.aux_layers == "default":
            return default_aux_layer_ids(num_layers)
        return list(self.aux_layers)

    def split_settings(self) -> dict:
        return {"seed": self.seed, "val_fraction": self.val_fraction, "max_train_samples": self.max_train_samples,
                "max_val_samples": self.max_val_samples}

    def default_dir(self) -> Path:
        """``cache_root()/features/<target>-<data>-L<max_length>-<aux>-<dtype>-<hash of the whole spec>``."""
        from spec_lightning.targets import cache_root

        def slug(text: str) -> str:
            return re.sub(r"[^A-Za-z0-9_.]+", "_", Path(str(text).rstrip("/")).name or str(text))[:40]

        aux = self.aux_layers if isinstance(self.aux_layers, str) else "aux" + "_".join(map(str, self.aux_layers))
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        data = "+".join(self.data) if isinstance(self.data, list) else self.data
        name = f"{slug(self.target)}-{slug(data)}-L{self.max_length}-{aux}-{self.storage_dtype}-{digest}"
        return cache_root() / "features" / name


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise FeatureCacheError(f"{path}: unreadable {what} ({str(e).splitlines()[0][:120]})") from None


def load_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a finished cache; a missing one names how many shards exist and the command to finish."""
    from spec_lightning.datamodules.feature_cache.format import FORMAT_NAME, FORMAT_VERSION, SHARD_DIR, record_name

    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_FILE
    if not path.is_file():
        plan_path = cache_dir / PLAN_FILE
        if plan_path.is_file():
            plan = read_json(plan_path, "plan")
            shards = plan.get("shards", [])
            done = sum((cache_dir / SHARD_DIR / record_name(s["file"])).is_file() for s in shards)
            raise FeatureCacheError(f"feature cache {cache_dir}: {MANIFEST_FILE} is missing, {done} of {len(shards)} "
                                    "shards are written (an interrupted or unfinished writer): run `python cli.py cache "
                                    "--config <the same config>` to finish it")
        raise FeatureCacheError(f"feature cache {cache_dir}: {MANIFEST_FILE} not found; build the cache first with "
                                "`python cli.py cache --config <your offline config>`")
    manifest = read_json(path, "manifest")
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise FeatureCacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
                                f", this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}: rebuild the cache")
    return manifest


def mismatches(manifest: dict, expected: dict[str, object]) -> list[str]:
    """``"<field>: <manifest value> in the manifest, <expected> configured"`` for each dotted field that differs."""
    out = []
    for key, want in expected.items():
        have: object = manifest
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if have != want:
            out.append(f"{key} is {have!r} in the manifest, {want!r} configured")
    return out


def check_manifest(manifest_path: Path, manifest: dict, expected: dict[str, object], what: str) -> None:
    """Raise a FeatureCacheError naming the manifest and every mismatch of ``expected`` (``what`` says which
    settings)."""
    problems = mismatches(manifest, expected)
    if problems:
        raise FeatureCacheError(f"feature cache {manifest_path} does not match the {what}: " + "; ".join(problems)
                                + ". Refusing to train on these features: rebuild the cache (python cli.py cache "
                                "--config <config>) or point cache_dir elsewhere")
