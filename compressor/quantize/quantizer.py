"""Round-to-nearest quantization of an exported checkpoint into compressed-tensors format, shard by shard.

Every linear weight inside the decoder layers (attention, dense MLPs, shared and routed experts) is quantized;
embeddings, norms, routers and lm_head stay as they are. Scales come from each weight's min/max (per output
channel, or per group of input columns) through compressed-tensors' `calculate_qparams`; the library's own
compressor for the scheme's format writes the tensors, and its `ModelCompressor` writes `quantization_config`.
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from compressor import __version__
from compressor.errors import UserError
from compressor.export.exporter import PLAN_FILE, PROVENANCE_FILE, check_output_location
from compressor.families import open_checkpoint
from compressor.io import ShardedWriter
from compressor.io.atomic import atomic_directory
from compressor.io.writer import TensorSpec

# scheme -> compressed-tensors preset
SCHEMES = {"fp8-dynamic": "FP8_DYNAMIC", "w8a16": "W8A16", "w4a16": "W4A16"}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
           "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json", PLAN_FILE)


@dataclass
class QuantizeOptions:
    scheme: str = "w4a16"
    group_size: int = 128  # int schemes: input columns per scale; 0: per output channel
    max_shard_bytes: int = 5 * 2**30
    overwrite: bool = False
    progress: bool = True
    validation: object | None = None  # ExportValidation; None: not validated
    run: object | None = None  # RunOptions for the validation


@dataclass
class QuantizeResult:
    output: Path
    scheme: str
    quantized: int  # weights quantized
    bytes: int
    source_bytes: int
    validation: object | None = None
    extra: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one line each, for stderr (also in provenance and card)


def quantization_scheme(scheme: str, group_size: int = 128):
    """The compressed-tensors QuantizationScheme for `scheme` (targets every Linear)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    result = preset_name_to_scheme(SCHEMES[scheme], ["Linear"])
    if result.weights.group_size is not None and group_size:
        result.weights.group_size = group_size
    elif result.weights.group_size is not None:  # 0: one scale per output channel
        result.weights = result.weights.model_copy(update={"strategy": "channel", "group_size": None})
    return result


def rtn_qparams(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zero points of a [out, in] weight for its strategy (channel, group or tensor)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    values = weight.float()
    if args.strategy == "group":
        values = values.unflatten(-1, (-1, args.group_size))
        low, high = values.amin(-1), values.amax(-1)
    elif args.strategy == "channel":
        low, high = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
    else:
        low, high = torch.aminmax(values)
    scale, zero_point = calculate_qparams(low, high, args)
    return scale.to(weight.dtype), zero_point


def quantized_names(checkpoint) -> list[str]:
    """The on-disk weights to quantize: 2-D linear weights in the decoder layers that are not routers."""
    names = []
    for name in checkpoint.reader.names():
        role = checkpoint.layout.classify(name)
        if role.layer is None or role.kind == "router" or not name.endswith(".weight"):
            continue
        shape = checkpoint.reader.info(name).shape
        if role.kind == "expert" and len(shape) != 2:
            raise UserError(f"{name} holds all experts of a layer in one tensor (fused on disk); quantize supports "
                            "checkpoints that store each expert's projections separately")
        if len(shape) == 2:
            names.append(name)
    return names


def check_quantizable(directory: Path) -> None:
    """A moe-compress output that is not quantized yet (UserError otherwise)."""
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a checkpoint directory (no config.json)")
    if not (directory / PROVENANCE_FILE).is_file():
        raise UserError(f"{directory} is not a moe-compress output (no {PROVENANCE_FILE}); quantize a directory "
                        "written by `moe-compress export`")
    config = json.loads((directory / "config.json").read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "unknown")
        raise UserError(f"{directory} is already quantized ({method}); quantize the unquantized export")


def quantize_checkpoint(source: Path, output: Path, options: QuantizeOptions) -> QuantizeResult:
    """Write `source` (a moe-compress export) quantized with `options.scheme` into `output`, atomically."""
    source, output = Path(source), Path(output)
    scheme = quantization_scheme(options.scheme, options.group_size)
    check_quantizable(source)
    if options.validation is not None:
        from compressor.export.exporter import check_gates_can_run, check_tasks_can_run

        check_gates_can_run(_validation_options(source, options))
        check_tasks_can_run(_validation_options(source, options))
    check_output_location(source, output, options.overwrite)
    checkpoint = open_checkpoint(source)
    try:
        return _quantize(checkpoint, source, output, scheme, options)
    except OSError as error:
        raise UserError(f"writing {output} failed: {error.strerror or error}; nothing was written") from error
    finally:
        checkpoint.close()


def _quantize(checkpoint, source: Path, output: Path, scheme, options: QuantizeOptions) -> QuantizeResult:
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    reader, family = checkpoint.reader, checkpoint.family
    targets = set(quantized_names(checkpoint))
    group = scheme.weights.group_size
    if group is not None:
        ragged = sorted(name for name in targets if reader.info(name).shape[1] % group)
        if ragged:
            raise UserError(f"--group-size {group} does not divide the input width of {ragged[0]} "
                            f"({reader.info(ragged[0]).shape[1]} columns); choose a divisor of every layer's width")
    fmt = infer_module_format(torch.nn.Linear, scheme)
    compressor = BaseCompressor.get_value_from_registry(fmt.value)
    from compressor.serving.check import cpu_int4_moe_problem, expert_widths

    cpu_problem = cpu_int4_moe_problem(options.scheme, expert_widths(checkpoint.layout, checkpoint.config))

    def compressed(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.device.type == "meta":  # planning: the compressor gives the output tensors' shapes and dtypes
            rows, columns = weight.shape
            shape = {"group": (rows, columns // (group or 1)), "channel": (rows, 1)}.get(scheme.weights.strategy, (1,))
            state = {"weight": weight, "weight_scale": torch.empty(shape, dtype=weight.dtype, device="meta")}
        else:
            scale, zero_point = rtn_qparams(weight, scheme.weights)
            state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
        stem = name.removesuffix("weight")
        return {stem + key: value for key, value in sorted(compressor.compress(state, scheme).items())}

    specs = []
    for name in reader.names():
        info = reader.info(name)
        if name in targets:
            meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
            specs += [TensorSpec(key, value.dtype, value.shape) for key, value in compressed(name, meta).items()]
        else:
            specs.append(TensorSpec(name, info.dtype, info.shape))
    ignore = ["lm_head"] + sorted({name.removesuffix(".weight") for name in reader.names()
                                   if checkpoint.layout.classify(name).kind == "router"
                                   and name.endswith(".weight")})
    quant_config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format=fmt.value,
                                      quantization_status=QuantizationStatus.COMPRESSED)

    with atomic_directory(output, options.overwrite) as staging:
        total = sum(spec.nbytes for spec in specs)
        writer = ShardedWriter.planned(staging, specs, options.max_shard_bytes, metadata={"format": "pt"}, index=None)
        try:
            with tqdm(total=len(reader.names()), desc=f"quantize {options.scheme}", unit="tensor",
                      disable=not options.progress, dynamic_ncols=True) as bar:
                for name in reader.names():
                    if name in targets:
                        for key, value in compressed(name, reader.get(name)).items():
                            writer.write(key, value.contiguous())
                    else:
                        writer.write_range(name, *reader.raw_location(name))
                    bar.update(1)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        shutil.copyfile(source / "config.json", staging / "config.json")
        ModelCompressor(quantization_config=quant_config).update_config(str(staging))
        family.write_runtime_files(staging, json.loads((staging / "config.json").read_text()))
        for name in _COPIED:
            if (source / name).exists():
                shutil.copyfile(source / name, staging / name)
        if (source / "validation.json").exists():  # the export's own validation, next to the quantized one
            shutil.copyfile(source / "validation.json", staging / "export_validation.json")
        if (source / "plots").is_dir():
            shutil.copytree(source / "plots", staging / "export_plots")
        provenance = json.loads((source / PROVENANCE_FILE).read_text())
        provenance["quantization"] = {
            "scheme": options.scheme, "format": fmt.value, "method": "round-to-nearest (min/max)",
            "group_size": group, "weights_quantized": len(targets), "ignored": ignore, "source": str(source),
            "source_bytes": reader.total_bytes, "bytes": total, "tool_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if cpu_problem:
            provenance["quantization"]["vllm_cpu"] = f"will not serve correctly: {cpu_problem}"
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        result = QuantizeResult(output, options.scheme, len(targets), total, reader.total_bytes)
        if cpu_problem:
            result.warnings.append(f"{output} will not serve correctly on vLLM's CPU build: {cpu_problem}; vLLM's GPU "
                                   "builds run other kernels")
        if options.validation is not None and options.validation.enabled:
            result.validation = _validate(source, provenance, staging, output, options)
        from compressor.quantize.card import write_quantized_card

        write_quantized_card(staging, source, str(output), provenance, result.validation)
    return result


def _validation_options(source: Path, options: QuantizeOptions):
    """ExportOptions for the validation; default held-out data: the evaluation split of the export's demo
    calibration domains."""
    from compressor.export.exporter import ExportOptions, FitOptions, RunOptions

    calibration = json.loads((source / PROVENANCE_FILE).read_text()).get("calibration") or {}
    return ExportOptions(run=options.run or RunOptions(), validation=options.validation,
                         fit=FitOptions(calibration=calibration))


def _validate(source: Path, provenance: dict, staging: Path, output: Path, options: QuantizeOptions):
    """Original (the export's source) vs the quantized output, as export validates."""
    from compressor.export.exporter import _validate_output
    from compressor.io.resolve import resolve_model

    model = provenance["source_model"]
    source_dir, _ = resolve_model(model, provenance.get("source_revision"))
    return _validate_output(model, source_dir, staging, _validation_options(source, options), output)
