"""The fallback engine without vLLM: HF ``generate`` on left-padded batches, on any device."""

from __future__ import annotations

import torch

from spec_lightning.datagen.engines.base import Completion, Engine, Sampling, config_sha256, eos_ids_of, split_stop


class HFEngine(Engine):
    """HF ``generate`` over batches of ``batch_size`` prompts (greedy, or seeded sampling per batch)."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 32) -> None:
        import transformers

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.version = transformers.__version__
        self.eos_ids = eos_ids_of(model.generation_config, tokenizer)
        if tokenizer.pad_token_id is None:  # padding tokens are masked out; any id does, eos is conventional
            tokenizer.pad_token_id = min(self.eos_ids)
        self.pad_id = int(tokenizer.pad_token_id)
        self.target_config_sha256 = config_sha256(model.config)

    @classmethod
    def load(cls, target: str, dtype: str, device: str | None, batch_size: int, tokenizer=None) -> HFEngine:
        from spec_lightning.targets import load_target_model, load_tokenizer

        model = load_target_model(target, dtype)
        if device is not None:
            model.to(device)
        return cls(model, tokenizer if tokenizer is not None else load_tokenizer(target), batch_size)

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[Completion]:
        results: list[Completion] = []
        for i in range(0, len(prompts), self.batch_size):
            results += self._batch(prompts[i:i + self.batch_size], sampling, seed + i)
        return results

    @torch.no_grad()
    def _batch(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[Completion]:
        # Left padding: every prompt ends at the same column, so the new tokens line up.
        batch = self.tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        kwargs: dict = {"do_sample": False}
        if not sampling.greedy:
            torch.manual_seed(seed)
            kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        out = self.model.generate(
            input_ids=input_ids.to(self.model.device), attention_mask=attention_mask.to(self.model.device),
            max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids),
            use_cache=True, **kwargs,
        )
        results = []
        for row in out[:, input_ids.shape[1]:].tolist():
            stop = next((j for j, t in enumerate(row) if t in self.eos_ids), None)
            results.append(split_stop(row, "length", self.eos_ids) if stop is None else (row[:stop], "stop"))
        return results
