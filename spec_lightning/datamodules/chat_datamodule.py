"""LightningDataModule that tokenises chat conversations (online training: the module runs the target)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from jinja2 import TemplateError
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from spec_lightning.atomic import atomic_directory
from spec_lightning.contract import DataLink, TokenRows
from spec_lightning.datamodules.catalog import check_distilled_for, read_sources, sources_fingerprint
from spec_lightning.datamodules.chat import tokenize_conversation
from spec_lightning.datamodules.packing import PackedDataset, collate_packed
from spec_lightning.datamodules.sampling import EpochSampler, ResumableDataLoader
from spec_lightning.datamodules.sources import DataError
from spec_lightning.integrity import tree_digest, tree_problems
from spec_lightning.targets import cache_root, load_tokenizer

log = logging.getLogger(__name__)

# Bump when tokenisation or the cache layout changes: old caches are then never reused.
TOKENIZATION_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    h = hashlib.sha256(json.dumps(vocab).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]


def collate_chat(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of ``input_ids``/``loss_mask`` into ``[B, T]`` tensors with an attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(r["input_ids"])
        attention_mask[i, :n] = 1
        loss_mask[i, :n] = torch.as_tensor(r["loss_mask"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def tokenize_source(tokenizer, data: str | list[str], max_length: int, long_samples: str,
                    on_bad_sample: str) -> tuple[dict, dict]:
    """Tokenise every conversation of ``data`` (a source or a mix); return (columns, report). Raises on bad samples
    if asked."""
    start = time.perf_counter()
    read = read_sources(data)
    if read.bad and on_bad_sample == "error":
        raise DataError(f"bad sample {read.bad[0]} (set on_bad_sample='skip' to skip such samples)")
    columns: dict[str, list] = {"input_ids": [], "loss_mask": [], "id": [], "origin": []}
    # Group reasons by kind: "turn 3: unknown role 'x' (expected ...)" -> "unknown role 'x'".
    skipped = Counter(re.sub(r"^turn \d+: ", "", b.reason).split(" (")[0] for b in read.bad)
    examples = [str(b) for b in read.bad[:5]]
    truncated = 0
    for conv in read.conversations:
        try:
            tok = tokenize_conversation(tokenizer, conv["messages"])
        except (ValueError, TemplateError) as e:  # the chat template refuses or mangles this conversation
            if on_bad_sample == "error":
                raise DataError(f"{conv['origin']}: the chat template cannot render it ({e})") from None
            skipped["chat template refused the conversation"] += 1
            examples.append(f"{conv['origin']}: chat template: {e}")
            continue
        ids, mask = tok.input_ids, tok.loss_mask
        if len(ids) > max_length:
            if long_samples == "error":
                raise DataError(f"{conv['origin']}: sample has {len(ids)} tokens, longer than max_length={max_length}")
            if long_samples == "skip":
                skipped[f"longer than max_length={max_length}"] += 1
                examples.append(f"{conv['origin']}: {len(ids)} tokens > max_length={max_length}")
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            truncated += 1
        if sum(mask[1:]) == 0:
            skipped["no assistant token left after truncation"] += 1
            continue
        columns["input_ids"].append(ids)
        columns["loss_mask"].append(mask)
        columns["id"].append(conv["id"])
        columns["origin"].append(conv["origin"])
    seconds = time.perf_counter() - start
    report = {
        "data": data,
        "conversations_read": len(read.conversations) + len(read.bad),
        "kept": len(columns["input_ids"]),
        "truncated": truncated,
        "skipped": dict(skipped),
        "skipped_examples": examples[:10],
        "tokens": sum(len(x) for x in columns["input_ids"]),
        "trainable_tokens": sum(sum(m) for m in columns["loss_mask"]),
        "seconds": round(seconds, 2),
        "conversations_per_second": round((len(read.conversations) + len(read.bad)) / max(seconds, 1e-9), 1),
    }
    if not columns["input_ids"]:
        raise DataError(f"{data}: no usable conversations (skipped: {dict(skipped)}; e.g. {examples[:3]})")
    return columns, report


class ChatDataModule(LightningDataModule):
    """Chat conversations -> right-padded batches of ``input_ids``, ``attention_mask``, ``loss_mask``.

    Args:
        tokenizer: target source whose tokenizer and chat template are used (linked to the model's target).
        data: builtin name (``chitchat`` human replies; ``chitchat-smollm2``, ``magpie-smollm2``,
            ``magpie-tasks-smollm2`` self-distilled by SmolLM2), a .json/.jsonl/.parquet file, a ``datasets``
            directory, or a list of them (mixed in that order).
        max_length: samples longer than this many tokens are truncated (or skipped, see ``long_samples``).
        batch_size: conversations per batch.
        val_fraction: share of conversations held out for validation (seeded split).
        seed: seed of the train/validation split.
        max_train_samples: use at most this many training conversations (``None``: all).
        max_val_samples: use at most this many validation conversations (``None``: all).
        long_samples: ``truncate``, ``skip`` or ``error`` for samples longer than ``max_length``.
        on_bad_sample: ``skip`` (count and report) or ``error`` for malformed samples.
        num_workers: DataLoader workers.
        pack: pack whole training conversations into rows of ``max_length`` tokens (document boundaries kept:
            ``datamodules.packing``); validation batches stay unpacked.
        allow_other_target: train on self-distilled data (a builtin set or a ``regenerate`` / ``synthesize`` output)
            that another target wrote; refused by default, since a draft learns to predict its own target.
        link: the model's :class:`~spec_lightning.contract.DataLink` (the CLI passes ``model.data_link``): ``setup``
            hands the training and validation splits' tokens back on it.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        data: str | list[str] = "chitchat",
        max_length: int = 512,
        batch_size: int = 4,
        val_fraction: float = 0.05,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        long_samples: str = "truncate",
        on_bad_sample: str = "skip",
        num_workers: int = 0,
        pack: bool = False,
        allow_other_target: bool = False,
        link: DataLink | None = None,
    ) -> None:
        super().__init__()
        if long_samples not in ("truncate", "skip", "error"):
            raise ValueError(f"long_samples must be 'truncate', 'skip' or 'error', got {long_samples!r}")
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.save_hyperparameters(ignore=["link"])
        self.link = link
        self.tokenizer_source = tokenizer
        self.data = data
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.long_samples = long_samples
        self.on_bad_sample = on_bad_sample
        self.num_workers = num_workers
        self.pack = pack
        self.allow_other_target = allow_other_target
        self._tokenizer = None
        self._fingerprint: str | None = None
        self.train_dataset = None
        self.val_dataset = None
        self.report: dict | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def fingerprint(self) -> str:
        """Identity of the tokenised data: source content, tokenizer + template, length policy, code version."""
        if self._fingerprint is None:
            parts = [
                f"v{TOKENIZATION_VERSION}",
                sources_fingerprint(self.data),
                tokenizer_fingerprint(self.tokenizer),
                str(self.max_length),
                self.long_samples,
            ]
            self._fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
        return self._fingerprint

    @property
    def cache_dir(self) -> Path:
        return cache_root() / "data" / self.fingerprint

    def cache_problems(self) -> list[str]:
        """Why the tokenised cache cannot be trusted (missing, unreadable report, changed or missing files); [] if ok."""
        report_path = self.cache_dir / "report.json"
        if not report_path.is_file():
            return [f"{report_path} is missing"]
        try:
            digest = json.loads(report_path.read_text()).get("files_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return [f"{report_path} is not a valid report"]
        if not isinstance(digest, dict) or not digest:
            return [f"{report_path} holds no content hashes (an older cache)"]
        return tree_problems(self.cache_dir / "dataset", digest)

    def prepare_data(self) -> None:
        """Tokenise once and cache (rank 0); a cache that fails verification is rebuilt; a failure leaves no partial
        cache behind."""
        import datasets

        check_distilled_for(self.data, self.tokenizer_source, self.allow_other_target)  # before building any set
        out = self.cache_dir
        if out.exists():
            problems = self.cache_problems()
            if not problems:
                return
            log.warning("tokenised data cache %s failed verification (%s); rebuilding it", out, problems[0])
        columns, report = tokenize_source(
            self.tokenizer, self.data, self.max_length, self.long_samples, self.on_bad_sample
        )
        with atomic_directory(out) as tmp:
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / "dataset"))
            report["files_sha256"] = tree_digest(tmp / "dataset")
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")  # written last: marks complete
        self._log_report(report)

    @staticmethod
    def _log_report(report: dict) -> None:
        msg = (
            f"prepared {report['data']}: kept {report['kept']} of {report['conversations_read']} conversations, "
            f"truncated {report['truncated']}, skipped {sum(report['skipped'].values())} {report['skipped']}, "
            f"{report['conversations_per_second']} conversations/s"
        )
        log.warning(msg) if report["skipped"] or report["truncated"] else log.info(msg)
        for example in report.get("skipped_examples", [])[:5]:
            log.warning("  skipped: %s", example)

    def setup(self, stage: str | None = None) -> None:
        """Load the verified tokenised splits (tokenising first if needed); hand their tokens to the model's
        :attr:`link`."""
        if self.train_dataset is None:
            self.load_splits()
        if self.link is not None:
            self.link.provide(training_tokens=self.training_tokens(), validation_tokens=self.validation_tokens())

    def load_splits(self) -> None:
        import datasets

        check_distilled_for(self.data, self.tokenizer_source, self.allow_other_target)
        if self.cache_problems():
            self.prepare_data()
        problems = self.cache_problems()
        if problems:  # rebuilt just now and still wrong: another process is rewriting it, or the disk is failing
            raise DataError(f"tokenised data cache {self.cache_dir} cannot be verified: {problems[0]}")
        self.report = json.loads((self.cache_dir / "report.json").read_text())
        try:
            full = datasets.load_from_disk(str(self.cache_dir / "dataset"))
        except Exception as e:  # verified bytes that do not load: a datasets version change
            raise DataError(f"tokenised data cache {self.cache_dir / 'dataset'} does not load "
                            f"({str(e).splitlines()[0][:160]}); delete it to rebuild") from None
        if len(full) < 2:
            raise DataError(f"{self.data}: need at least 2 usable conversations for a train/val split, got {len(full)}")
        split = full.train_test_split(test_size=self.val_fraction, seed=self.seed, shuffle=True)
        train, val = split["train"], split["test"]
        if self.max_train_samples is not None:
            train = train.select(range(min(self.max_train_samples, len(train))))
        if self.max_val_samples is not None:
            val = val.select(range(min(self.max_val_samples, len(val))))
        self.train_dataset, self.val_dataset = train, val

    def training_tokens(self) -> TokenRows:
        """The training split's token rows and their identity (data fingerprint and split), for a draft vocabulary."""
        train = self.train_dataset
        return TokenRows(read_rows=lambda: train, fingerprint=f"{self.fingerprint}|{self.split_fingerprint}")

    def validation_tokens(self) -> TokenRows:
        """The validation split's token rows, in order (held-out prompts are cut from them)."""
        val = self.val_dataset
        return TokenRows(read_rows=lambda: val, fingerprint=f"{self.fingerprint}|{self.split_fingerprint}|val")

    @property
    def split_fingerprint(self) -> str:
        """What selects the training split from the cached data (seed, validation share, sample caps)."""
        return f"seed={self.seed}|val={self.val_fraction}|train_cap={self.max_train_samples}"

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        """Training: a :class:`ResumableDataLoader` (order a function of (seed, epoch), sharded over the trainer's
        data-parallel ranks, position saved in checkpoints), packed rows with ``pack``. Validation: a plain loader in
        file order (Lightning shards it under DDP)."""
        cols = dataset.select_columns(["input_ids", "loss_mask"])
        kwargs = {"batch_size": self.batch_size, "num_workers": self.num_workers,
                  "collate_fn": partial(collate_chat, pad_id=self.pad_id)}
        if shuffle and self.pack:
            cols = PackedDataset(cols, self.max_length, self.seed)
            kwargs["collate_fn"] = partial(collate_packed, pad_id=self.pad_id, length=self.max_length)
        if not shuffle:
            return DataLoader(cols, shuffle=False, **kwargs)
        trainer = self.trainer
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = EpochSampler(cols, num_replicas=shard.get("num_replicas", 1), rank=shard.get("rank", 0),
                               shuffle=True, seed=self.seed)
        return ResumableDataLoader(cols, sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)
