"""The target's hidden states from vLLM (``extract_hidden_states``) for offline feature caches.

Layer ids (SPEC §8.1, measured on SmolLM2 fp32 against HF ``output_hidden_states``): vLLM's id k is the residual
stream after k decoder layers (HF ``hidden_states[k]``), so our aux id i (the output of decoder layer i, HF
``hidden_states[i + 1]``) is vLLM id i + 1. vLLM's id N (N = ``num_hidden_layers``) is the residual after the last
layer *before* the final norm; the cache stores the lm_head input, so the target's own final norm is applied here
(``targets.load_target_head``: the same norm module the offline loss uses).

:class:`VllmFeatureTarget` is called like ``FrozenTarget`` (``target(ids, attention_mask, aux_layer_ids=...)`` ->
``TargetFeatures``), so the feature-cache writer takes it unchanged: shards, checksums, manifest and resume are the
writer's own. One ``max_tokens=1`` request per sample; padding columns are not sent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch
from torch import Tensor

from spec_lightning.datagen.engines.vllm_local import VllmOptions, cpu_environment, engine_kwargs, import_vllm
from spec_lightning.targets import TargetFeatures, resolve_target

CPU_CONNECTOR_MODULE = "spec_lightning.datagen.vllm_cpu_connector"


def vllm_layer_ids(aux_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """vLLM ``eagle_aux_hidden_state_layer_ids`` for our aux ids plus the last layer (see module docstring)."""
    if any(not 0 <= i < num_layers - 1 for i in aux_layer_ids):
        raise ValueError(f"aux layer ids must be decoder layers 0..{num_layers - 2} (the last layer is the final "
                         f"state), got {list(aux_layer_ids)}")
    return [i + 1 for i in aux_layer_ids] + [num_layers]


class VllmFeatureTarget:
    """vLLM running ``target`` with hidden-state extraction for ``aux_layer_ids`` and the final state."""

    engine = "vllm"

    def __init__(self, target: str, dtype: str, aux_layer_ids: Sequence[int], options: VllmOptions | None = None,
                 max_num_seqs: int = 32) -> None:
        from transformers import AutoConfig

        from spec_lightning.targets.head import load_target_head

        vllm = import_vllm()
        self.version = vllm.__version__
        options = options or VllmOptions()
        target_dir, _ = resolve_target(target)
        num_layers = AutoConfig.from_pretrained(target_dir).get_text_config().num_hidden_layers
        self.aux_layer_ids = list(aux_layer_ids)
        self.head = load_target_head(target, dtype)  # the final norm, applied to vLLM's pre-norm last layer
        self.dtype = getattr(torch, dtype)
        self.storage = tempfile.TemporaryDirectory(prefix="spec_lightning_hidden_")
        cpu_environment(options)
        self.llm = vllm.LLM(**engine_kwargs(target_dir, dtype, options, options.max_num_seqs or max_num_seqs),
                            **self._extraction(vllm_layer_ids(self.aux_layer_ids, num_layers)))

    def _extraction(self, layer_ids: list[int]) -> dict:
        from vllm.config import KVTransferConfig

        on_gpu = torch.cuda.is_available()
        transfer = {"kv_connector": "ExampleHiddenStatesConnector" if on_gpu else "CpuHiddenStatesConnector",
                    "kv_role": "kv_producer",
                    "kv_connector_extra_config": {"shared_storage_path": self.storage.name}}
        if not on_gpu:
            transfer["kv_connector_module_path"] = CPU_CONNECTOR_MODULE
        return {"speculative_config": {"method": "extract_hidden_states", "num_speculative_tokens": 1,
                                       "draft_model_config": {"hf_config": {
                                           "eagle_aux_hidden_state_layer_ids": layer_ids}}},
                "kv_transfer_config": KVTransferConfig(**transfer)}

    def capture(self, samples: list[list[int]]) -> list[Tensor]:
        """Per sample ``[len, n_aux + 1, H]``: the aux layers' outputs and the final (pre-norm) state."""
        from vllm import SamplingParams
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states,
            load_hidden_states,
        )
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in samples],
                                    SamplingParams(max_tokens=1), use_tqdm=False)
        states = []
        for sample, out in zip(samples, outputs, strict=True):
            path = out.kv_transfer_params["hidden_states_path"]
            data = load_hidden_states(path)
            cleanup_hidden_states(path)
            if data["token_ids"].tolist() != list(sample):
                raise RuntimeError(f"vLLM returned hidden states of other tokens for request {out.request_id}")
            states.append(data["hidden_states"])
        return states

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 aux_layer_ids: Sequence[int] = ()) -> TargetFeatures:
        if list(aux_layer_ids) != self.aux_layer_ids:
            raise ValueError(f"this engine extracts aux layers {self.aux_layer_ids}, asked for {list(aux_layer_ids)}")
        lengths = (attention_mask.sum(-1) if attention_mask is not None
                   else torch.full((input_ids.shape[0],), input_ids.shape[1])).tolist()
        states = self.capture([row[:n].tolist() for row, n in zip(input_ids, lengths, strict=True)])
        b, t, n_aux = input_ids.shape[0], input_ids.shape[1], len(self.aux_layer_ids)
        h = states[0].shape[-1]
        final = torch.zeros(b, t, h, dtype=self.dtype)
        aux = torch.zeros(b, t, n_aux * h, dtype=self.dtype) if n_aux else None
        for row, (state, n) in enumerate(zip(states, lengths, strict=True)):
            final[row, :n] = self.head.final_norm(state[:, -1].to(self.dtype))
            if aux is not None:
                aux[row, :n] = state[:, :-1].to(self.dtype).reshape(n, n_aux * h)
        return TargetFeatures(aux_hidden=aux, final_hidden=final, logits=None)

    def to(self, device) -> VllmFeatureTarget:  # vLLM places the target itself
        return self

    def close(self) -> None:
        self.llm = None
        self.storage.cleanup()
