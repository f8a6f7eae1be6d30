"""`moe-compress serve-check OUT`: does vLLM load and run an output, with the same results as our transformers code?"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from compressor.errors import UserError
from compressor.families import get_family

_EXAMPLE = '{"custom_ops": ["all", "-rotary_embedding"]}'


@click.command("serve-check")
@click.argument("output", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--vllm-python", default=None, metavar="PATH",
              help="interpreter with vLLM (default: $MOE_COMPRESS_VLLM_PYTHON, this one, or .venv-vllm/bin/python)")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="compare vLLM's prompt logprobs with moe-compress's transformers implementation (limits by dtype)")
@click.option("--tolerance", type=float, default=None,
              help="limit on max |logprob difference| for fp32 runs (default 1e-4), on the mean |difference| for "
                   "bf16 and quantized runs (defaults: README)")
@click.option("--dtype", default=None,
              help="vLLM dtype (default: what vLLM's CPU build needs for the family, there; with --compare "
                   "float32, bfloat16 for quantized outputs; else auto)")
@click.option("--max-model-len", type=click.IntRange(min=16), default=512, show_default=True)
@click.option("--kv-cache-gib", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU backend: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
@click.option("--compilation-config", default=None, metavar="JSON",
              help=f"vLLM compilation config, e.g. '{_EXAMPLE}' (as `vllm serve --compilation-config`)")
@click.option("--timeout", type=click.IntRange(min=10), default=1800, show_default=True,
              help="seconds for the vLLM run")
def serve_check(output, vllm_python, compare, tolerance, dtype, max_model_len, kv_cache_gib, compilation_config,
                timeout):
    """Check that vLLM serves OUT: expert counts that agree with the tensors (per-layer counts: moe-compress's vLLM
    plugin installed), the shipped configuration file, a load and a generation in vLLM, and (--compare) prompt logprobs
    within the limits for what vLLM computes in (fp32, bf16, quantized weights) of moe-compress's transformers
    implementation.

    Exit 0: servable; 1: vLLM failed or its logprobs differ; 2: bad input (not servable, or vLLM missing)."""
    from compressor.serving.check import (
        VllmRunError,
        check_cpu_build,
        check_plugin,
        check_prompts,
        check_servable,
        compare_limits,
        find_vllm_python,
        run_vllm,
        transformers_logprob_diff,
    )

    compilation = None
    if compilation_config:
        try:
            compilation = json.loads(compilation_config)
        except json.JSONDecodeError as error:
            raise UserError(f"--compilation-config is not JSON ({error.msg}); e.g. '{_EXAMPLE}'") from None
        if not isinstance(compilation, dict):
            raise UserError(f"--compilation-config must be a JSON object, e.g. '{_EXAMPLE}'")
    info = check_servable(output)
    python = find_vllm_python(vllm_python)
    check_plugin(python, info)
    cpu = check_cpu_build(python, info)
    family = get_family(info.family)
    if not dtype:
        dtype = (family.vllm_cpu_dtype if cpu else None) or (
            ("bfloat16" if info.quantization else "float32") if compare else "auto")
    limits = compare_limits(info.quantization, dtype, tolerance) if compare else None
    counts = sorted(set(info.per_layer.values()))
    experts = (f"{counts[0]} to {counts[-1]} routed experts per layer ({info.architecture}, moe-compress's vLLM "
               "plugin) in" if counts else f"{info.experts} routed experts in each of")
    click.echo(f"{output}: {info.family} (model_type {info.model_type}), {experts} {info.moe_layers} MoE layers, "
               f"top-{info.top_k}, renormalise {'yes' if info.renormalize else 'no'}")
    prompts = check_prompts(output)
    request = {
        "models": [{"path": str(output.resolve()), "label": output.name}],
        "dtype": dtype,
        "max_model_len": max_model_len,
        "kv_cache_gib": kv_cache_gib,
        "trust_remote_code": info.trust_remote_code,
        "prompts": prompts,
        "prompt_logprobs": 5,
        "generate_tokens": 8,
        "transformers_compare": compare,
        "compilation_config": compilation,
        "cpu_engine_args": family.vllm_cpu_engine_args,
    }
    try:
        result = run_vllm(python, request, timeout=timeout)
    except VllmRunError as error:
        click.echo(f"vLLM could not run {output} ({python}): {error}", err=True)
        sys.exit(1)
    versions, entry = result["versions"], result["models"][0]
    rows = entry.get("prompt_logprobs") or []
    values = [v for prompt in rows for row in prompt if row for v in row.values()]
    click.echo(f"vLLM {versions['vllm']} (transformers {versions['transformers']}, torch {versions['torch']}): "
               f"{'/'.join(entry['architecture'])} loaded in {entry['load_seconds']:.1f} s, "
               f"generated {sum(map(len, entry['generated']))} tokens, {len(values)} prompt logprobs")
    failures = []
    if not values or not all(v == v and abs(v) != float("inf") for v in values):
        failures.append("vLLM's prompt logprobs are missing or not finite")
    if compare:
        import transformers

        gap = transformers_logprob_diff(output, prompts, rows)
        loaded = ", weights dequantized" if info.quantization else ""
        click.echo(f"prompt logprobs (vLLM {dtype}) vs moe-compress (transformers {transformers.__version__}, fp32"
                   f"{loaded}): {_gap(gap)} ({limits.describe()})")
        failures += limits.failures(gap, "moe-compress's implementation")
        theirs = entry.get("transformers")
        if theirs:
            click.echo(f"prompt logprobs vs {'.'.join(theirs['class'].split('.')[-2:])} under vLLM's transformers "
                       f"{theirs['transformers_version']}: {_gap(theirs)}")
            failures += limits.failures(theirs, "the output's own modeling code under vLLM's transformers")
    if failures:
        workaround = family.vllm_cpu_workaround
        if workaround and result.get("platform") == "cpu" and compilation is None:
            config, why = workaround
            failures.append(f"{why}; retry with --compilation-config '{config}' and serve with the same")
        click.echo("NOT servable as validated: " + "; ".join(failures), err=True)
        sys.exit(1)
    extra = f" --compilation-config '{json.dumps(compilation)}'" if compilation else ""
    if result.get("platform") == "cpu":
        extra += f" --dtype {family.vllm_cpu_dtype}" if family.vllm_cpu_dtype else ""
        extra += "".join(f" --{key.replace('_', '-')} {value}"
                         for key, value in family.vllm_cpu_engine_args.items())
    click.echo(f"servable: {info.serve_command(result.get('vllm_command_works', True))}{extra}")



def _gap(gap: dict) -> str:
    return (f"max |diff| {gap['max_abs_diff']:.2e} (mean {gap['mean_abs_diff']:.2e}) over {gap['compared']} values, "
            f"top-1 agreement {gap['top1_agreement']:.3f} of {gap['positions']} positions")


__all__ = ["serve_check"]
