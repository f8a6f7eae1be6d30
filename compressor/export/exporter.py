"""Write the pruned checkpoint shard by shard, streaming tensors from the source (never loading the model)."""

from __future__ import annotations

import datetime
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from compressor import __version__
from compressor.errors import UserError
from compressor.export.mapping import TensorMapping
from compressor.families import detect_family, open_checkpoint
from compressor.io import CheckpointReader, ShardedWriter
from compressor.io.atomic import atomic_directory, check_writable_target
from compressor.io.resolve import resolve_model
from compressor.planning.plan import COMPENSATIONS

FITTED_COMPENSATIONS = ("scale", "refit", "distill")
PLAN_FILE = "compression_plan.json"
PROVENANCE_FILE = "moe_compress_provenance.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass
class RunOptions:
    """How models run during an export (fitting and validation)."""

    device: str = "auto"
    dtype: str = "float32"  # compute dtype
    seq_len: int = 512
    batch_size: int = 8
    progress: bool = True


@dataclass
class DistillOptions:
    steps: int = 300  # Adam steps per MoE layer (layer-wise pass)
    lr: float = 1e-3
    batch_tokens: int = 4096
    router: bool = False  # also train the router
    e2e_steps: int = 0  # > 0: end-to-end distillation after the layer-wise pass (the model must fit)
    e2e_lr: float = 4e-4


@dataclass
class FitOptions:
    """Fitted compensation (scale, refit, distill): calibration data and distillation settings."""

    calibration: dict[str, str] = field(default_factory=dict)  # NAME -> SOURCE
    max_tokens: int = 32768  # calibration tokens in all
    distill: DistillOptions = field(default_factory=DistillOptions)


@dataclass
class ExportValidation:
    """The validation at the end of an export, and its gates."""

    enabled: bool = True
    data: dict[str, str] = field(default_factory=dict)  # NAME -> SOURCE; default: calibration's held-out split
    max_tokens: int = 16384
    max_ppl_increase: float | dict[str, float] | None = None  # per domain when a dict
    min_cosine: float | None = None
    tasks: tuple[str, ...] = ()  # lm-evaluation-harness tasks scored on both models
    task_limit: int | None = None
    tasks_include: tuple[str, ...] = ()
    max_task_drop: float | dict[str, float] | None = None  # absolute, per task when a dict


@dataclass
class ExportOptions:
    """What an export does, grouped by concern; the rewrite itself takes the top-level fields."""

    compensation: str | None = None  # None: the plan's
    max_shard_bytes: int = 5 * 2**30
    overwrite: bool = False
    revision: str | None = None
    run: RunOptions = field(default_factory=RunOptions)
    fit: FitOptions = field(default_factory=FitOptions)
    validation: ExportValidation = field(default_factory=ExportValidation)


@dataclass
class ExportResult:
    output: Path
    compensation: str
    tensors: int
    bytes: int
    fit_report: dict = field(default_factory=dict)
    validation: object | None = None  # ValidationReport when validated


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count -> bytes (at least 1 byte, at most 1 PiB)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"cannot read size {text!r}: use e.g. 5GB, 500MB or a number of bytes") from None
    if unit not in units or not math.isfinite(value) or not 1 <= value * units[unit] <= 2**50:
        raise UserError(f"cannot read size {text!r}: use e.g. 5GB, 500MB or a number of bytes (1 byte to 1 PiB)")
    return int(value * units[unit])


def check_output_location(source: Path, output: Path, overwrite: bool) -> None:
    """OUT must not be the source, inside it, or (without --overwrite) an existing path."""
    source, resolved = source.resolve(), output.resolve()
    if resolved == source or source in resolved.parents:
        raise UserError(f"output {output} is the source checkpoint or inside it; choose another directory")
    if resolved in source.parents:
        raise UserError(f"output {output} contains the source checkpoint; choose another directory")
    check_writable_target(output, overwrite, directory=True)


def export_checkpoint(model: str, plan, output: Path, options: ExportOptions | None = None) -> ExportResult:
    """Rewrite `model` (local dir or Hub id) according to `plan` into `output` (atomically).

    On any failure nothing is left at `output` (and an existing one is kept); the source is only read.
    """
    try:
        return _export(model, plan, Path(output), options or ExportOptions())
    except OSError as error:
        raise UserError(f"writing {output} failed: {error.strerror or error}; nothing was written") from error


def _requantize(fitted, specs: dict, layout) -> dict:
    """Fitted weights of FP8 tensors re-quantized (one at a time), stored back with their new block scales; returns
    the error this adds (`_error_report`)."""
    from compressor.families.quantization import FP8_DTYPES, dequantize, quantize, scale_name

    errors = []
    for name in [n for n in list(fitted.files) if specs[n].dtype in FP8_DTYPES]:
        weight = fitted[name].float()
        quantized, scale = quantize(weight, layout.block, specs[name].dtype)
        errors.append(_relative_error(dequantize(quantized, scale, layout.block), weight))
        fitted.add_layer(layout.layer_of(name), {name: quantized,
                                                 scale_name(name): scale.to(specs[scale_name(name)].dtype)})
    return _error_report(errors)


def _requantize_mxfp4(fitted, specs: dict, layout) -> dict:
    """Fitted fused experts parameters of an MXFP4 checkpoint (``P``, one at a time) re-quantized and stored back as
    its ``P_blocks`` and ``P_scales``; returns the error this adds (`_error_report`)."""
    from compressor.families.quantization import MXFP4_PARTS, dequantize_mxfp4, quantize_mxfp4

    errors = []
    for name in [n for n in list(fitted.files) if n + MXFP4_PARTS[0] in specs]:
        weight = fitted.pop(name).float()
        blocks, scales = quantize_mxfp4(weight)
        errors.append(_relative_error(dequantize_mxfp4(blocks, scales), weight))
        fitted.add_layer(layout.layer_of(name + MXFP4_PARTS[0]), dict(zip((name + p for p in MXFP4_PARTS),
                                                                          (blocks, scales))))
    return _error_report(errors)


def _relative_error(quantized, weight) -> float:
    return float((quantized - weight).norm() / weight.norm().clamp_min(1e-30))


def _error_report(errors: list[float]) -> dict:
    """Re-quantization errors relative to each fitted weight, in Frobenius norm: the largest and the root mean
    square."""
    return {"tensors": len(errors), "max_relative_error": max(errors, default=0.0),
            "rms_relative_error": math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0}


def _export(model: str, plan, output: Path, options: ExportOptions) -> ExportResult:
    from compressor.planning import check_plan_matches

    compensation = options.compensation or plan.compensation
    if compensation not in COMPENSATIONS:
        raise UserError(f"--compensation must be one of {', '.join(COMPENSATIONS)}, not {compensation!r}")
    source_dir, revision = resolve_model(model, options.revision)
    check_output_location(source_dir, output, options.overwrite)
    source = open_checkpoint(source_dir)
    reader, config, family = source.reader, source.config, source.family
    check_plan_matches(plan, config, family)
    kept = plan.kept()
    new_config = family.pruned_config(config, kept, plan.top_k, ungroup=plan.ungroup)
    new_config.update(family.compensation_config(config, compensation))
    if compensation in FITTED_COMPENSATIONS and not options.fit.calibration:
        raise UserError(f"--compensation {compensation} fits on calibration data: pass --calibration NAME=SOURCE")
    check_gates_can_run(options)
    check_tasks_can_run(options)
    plan = plan.model_copy(update={"compensation": compensation})  # the output's plan says what was done
    if options.fit.distill.e2e_steps and compensation != "distill":
        raise UserError(f"end-to-end distillation steps apply to --compensation distill, not {compensation}")
    mapping = TensorMapping(source.layout, kept)
    outputs = mapping.plan(reader)
    parameters = sum(math.prod(o.spec.shape) for o in outputs)
    if options.fit.distill.e2e_steps:
        from compressor.export.compensation import check_end_to_end_memory
        from compressor.runtime import resolve_device, resolve_dtype

        check_end_to_end_memory(reader.total_parameters, parameters, resolve_device(options.run.device),
                                resolve_dtype(options.run.dtype))

    with atomic_directory(output, options.overwrite) as staging:
        fitted, fit_report = {}, {}
        if compensation in FITTED_COMPENSATIONS:
            from compressor.export.compensation import fit_compensation

            scratch = staging / ".fit-scratch"  # inside the staging folder: it goes wherever the staging goes
            scratch.mkdir()
            fitted, fit_report = fit_compensation(source, new_config, mapping, [o.name for o in outputs],
                                                  compensation, options.fit, options.run, scratch)
            specs = {o.name: o.spec for o in outputs}
            if source.layout.block:
                fit_report["fp8_requantization"] = _requantize(fitted, specs, source.layout)
            if source.layout.mxfp4:
                fit_report["mxfp4_requantization"] = _requantize_mxfp4(fitted, specs, source.layout)
        total = sum(o.spec.nbytes for o in outputs)
        writer = ShardedWriter.planned(staging, [o.spec for o in outputs], options.max_shard_bytes,
                                       metadata={"format": "pt"}, index=None)
        try:
            with tqdm(total=total, desc="export", unit="B", unit_scale=True, unit_divisor=1024,
                      disable=not options.run.progress, dynamic_ncols=True) as bar:
                for out in outputs:
                    if out.name in fitted:
                        writer.write(out.name, fitted.pop(out.name).to(out.spec.dtype).contiguous())
                    elif out.action == "slice":
                        writer.write(out.name, out.slice(reader.get(out.source)))
                    else:
                        writer.write_range(out.name, *reader.raw_location(out.source))
                    bar.update(out.spec.nbytes)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        (staging / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        family.write_runtime_files(staging, new_config)
        for name in _TOKENIZER_FILES:
            if (source_dir / name).exists():
                shutil.copyfile(source_dir / name, staging / name)
        (staging / PLAN_FILE).write_text(plan.model_dump_json(indent=1, exclude_none=True) + "\n")
        provenance = {
            "tool": "moe-compress",
            "tool_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_model": model,
            "source_revision": revision,
            "plan_hash": plan.content_hash(),
            "compensation": compensation,
            "calibration": options.fit.calibration,
            "fit": fit_report,
            "settings": {"max_shard_bytes": options.max_shard_bytes, "dtype": options.run.dtype,
                         "max_tokens": options.fit.max_tokens, "seq_len": options.run.seq_len,
                         **({"distill_steps": options.fit.distill.steps, "distill_router": options.fit.distill.router,
                             "distill_e2e_steps": options.fit.distill.e2e_steps,
                             "distill_e2e_lr": options.fit.distill.e2e_lr} if compensation == "distill" else {})},
            "tensors": len(outputs),
            "bytes": total,
            "parameters": parameters,
            "source_bytes": reader.total_bytes,
            "source_parameters": reader.total_parameters,
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if compensation in FITTED_COMPENSATIONS:
            shutil.rmtree(staging / ".fit-scratch")
        report = _validate_output(model, source_dir, staging, options, output) if options.validation.enabled else None
        from compressor.export.card import write_basic_card

        write_basic_card(staging, str(output), family, config, plan, provenance, report, source_dir)
    reader.close()
    return ExportResult(output, compensation, len(outputs), total, fit_report, report)


def check_gates_can_run(options: ExportOptions) -> None:
    """A validation gate that was asked for must run: refuse (before any work) gates without held-out data."""
    gates = options.validation
    if gates.max_ppl_increase is None and gates.min_cosine is None and gates.max_task_drop is None \
            and not gates.tasks:
        return
    from compressor.evaluation.harness import check_task_gate
    from compressor.validation.runner import check_cosine_gate, check_ppl_gate

    check_ppl_gate(gates.max_ppl_increase)
    check_cosine_gate(gates.min_cosine)
    check_task_gate(gates.max_task_drop)
    if gates.max_task_drop is not None and not gates.tasks:
        raise UserError("a task-drop gate (--max-task-drop) was given but no task is evaluated (--validate-tasks)")
    if not gates.enabled:
        raise UserError("validation gates or tasks (--max-ppl-increase / --min-cosine / --validate-tasks / "
                        "--max-task-drop) were given with --no-validate; drop one or the other")
    if not validation_sources(options):
        raise UserError("validation gates or tasks were given but there is no held-out data to validate on: pass "
                        "--validate-on NAME=SOURCE (only demo: calibration sources have a held-out split)")


def check_tasks_can_run(options: ExportOptions) -> None:
    """The validation's tasks exist and their data is on this machine (UserError naming the task otherwise)."""
    if options.validation.enabled and options.validation.tasks:
        from compressor.validation.runner import prepare_task_set

        prepare_task_set(_validate_options(options))


def validation_sources(options: ExportOptions) -> dict[str, str]:
    """Held-out data for the automatic validation: --validate-on, else the evaluation split of demo
    calibration domains (calibration never overlaps evaluation)."""
    if options.validation.data:
        return dict(options.validation.data)
    held_out = {}
    for name, spec in options.fit.calibration.items():
        if spec.startswith("demo:"):
            held_out[name] = spec.partition("@")[0] + "@evaluation"
    return held_out


def validate_export(model: str, output: Path, options: ExportOptions):
    """Validate an existing export of `model` in place: validation.json, plots/ and the model card's table."""
    from compressor.export.card import write_basic_card
    from compressor.planning import Plan

    source_dir, _ = resolve_model(model, options.revision)
    report = _validate_output(model, source_dir, output, options, output)
    if report is not None:
        config = CheckpointReader(source_dir).config
        write_basic_card(output, str(output), detect_family(config), config, Plan.load(output / PLAN_FILE),
                         json.loads((output / PROVENANCE_FILE).read_text()), report, source_dir)
    return report


def _validate_options(options: ExportOptions):
    from compressor.runtime import ForwardOptions
    from compressor.validation.runner import ValidateOptions

    v, run = options.validation, options.run
    forward = ForwardOptions(seq_len=run.seq_len, batch_size=run.batch_size, dtype=run.dtype, device=run.device)
    return ValidateOptions(max_tokens=v.max_tokens, forward=forward, max_ppl_increase=v.max_ppl_increase,
                           min_cosine=v.min_cosine, tasks=tuple(v.tasks), task_limit=v.task_limit,
                           tasks_include=tuple(v.tasks_include), max_task_drop=v.max_task_drop,
                           progress=options.run.progress)


def _validate_output(model: str, source_dir: Path, directory: Path, options: ExportOptions, output: Path):
    from compressor.validation.runner import validate_models

    sources = validation_sources(options)
    if not sources:
        print("note: no held-out data for validation (give --validate-on NAME=SOURCE); output not validated")
        return None
    report = validate_models(str(source_dir), str(directory), sources, _validate_options(options))
    report = report.model_copy(update={
        "original": report.original.model_copy(update={"source": model}),
        "compressed": report.compressed.model_copy(update={"source": str(output)}),
    })
    report.save(directory / "validation.json")
    from compressor.validation.plots import write_validation_plots

    write_validation_plots(report, directory / "plots")
    return report
