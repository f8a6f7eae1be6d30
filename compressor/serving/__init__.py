"""Serving compressed outputs with vLLM.

- `check_servable(OUT)`: static checks (expert counts that agree with the tensors and the output's plan, the shipped
  files the family needs, routing that means the same in vLLM and transformers, as the family adapter says);
  UserError naming the problem and fix.
- `find_vllm_python()`: the interpreter that has vLLM (vLLM lives in its own venv, see scripts/setup_vllm.sh);
  `check_plugin(python, info)`: per-layer expert counts need moe-compress's vLLM plugin (plugins/vllm) there.
- `run_vllm(python, request)`: runs ``vllm_runner.py`` (self-contained, executed by that interpreter) and returns
  what vLLM produced: prompt logprobs, generated tokens, throughput.
- `moe-compress serve-check OUT` (compressor/serving/cli.py) puts them together.
"""

from compressor.serving.check import (
    PLUGIN_ENTRY_POINT,
    PLUGIN_HINT,
    PLUGIN_INSTALL,
    RUNNER,
    SETUP_HINT,
    ServingInfo,
    VllmRunError,
    check_plugin,
    check_prompts,
    check_servable,
    find_vllm_python,
    plugin_state,
    run_vllm,
    transformers_logprob_diff,
)

__all__ = [
    "PLUGIN_ENTRY_POINT",
    "PLUGIN_HINT",
    "PLUGIN_INSTALL",
    "RUNNER",
    "SETUP_HINT",
    "ServingInfo",
    "VllmRunError",
    "check_plugin",
    "check_prompts",
    "check_servable",
    "find_vllm_python",
    "plugin_state",
    "run_vllm",
    "transformers_logprob_diff",
]
