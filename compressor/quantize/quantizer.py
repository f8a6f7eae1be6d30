"""Round-to-nearest quantization of an exported checkpoint, shard by shard: into compressed-tensors format, or
(``mxfp4``) into the MXFP4 format of families whose experts are fused on disk
(`FamilyAdapter.mxfp4_quantization_config`).

compressed-tensors schemes: every linear weight inside the decoder layers (attention, dense MLPs, shared and routed
experts) is quantized; embeddings, norms, routers and lm_head stay as they are. Scales come from each weight's
min/max (per output channel, or per group of input columns) through compressed-tensors' `calculate_qparams`; the
library's own compressor for the scheme's format writes the tensors, and its `ModelCompressor` writes
`quantization_config`. ``mxfp4``: the fused routed experts' weights become ``_blocks`` / ``_scales``
(`quantize_mxfp4`), everything else stays as it is, and `quantization_config` is the family's.
"""

from __future__ import annotations

import copy
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
MXFP4 = "mxfp4"  # the family's own MXFP4 format (fused experts on disk)
ALL_SCHEMES = (*SCHEMES, MXFP4)
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
        raise UserError(f"unknown scheme {scheme!r}; choose one of {', '.join(ALL_SCHEMES)}")
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
        shape = checkpoint.reader.info(name).shape
        if role.kind == "expert" and len(shape) > 2:
            hint = f"; --scheme {MXFP4} writes this family's MXFP4 format" \
                if checkpoint.family.mxfp4_quantization_config else ""
            raise UserError(f"{name} holds all experts of a layer in one tensor (fused on disk); the "
                            "compressed-tensors schemes need checkpoints that store each expert's projections "
                            f"separately{hint}")
        if role.layer is not None and role.kind != "router" and name.endswith(".weight") and len(shape) == 2:
            names.append(name)
    return names


def mxfp4_names(checkpoint) -> list[str]:
    """The on-disk weights that --scheme mxfp4 writes as MXFP4: the fused routed experts' [E, in, out] parameters
    (UserError where the family has no MXFP4 format or an input width is not a multiple of 32)."""
    family = checkpoint.family
    if family.mxfp4_quantization_config is None:
        raise UserError(f"--scheme {MXFP4} writes the MXFP4 format of families that store their experts fused on disk; "
                        f"{family.name} has none: choose one of {', '.join(SCHEMES)}")
    names = [t.name() for layer in checkpoint.layout.layers.values() for t in layer.experts
             if not t.per_expert and len(checkpoint.reader.info(t.name()).shape) == 3]
    for name in names:
        inputs = checkpoint.reader.info(name).shape[1]
        if inputs % 32:
            raise UserError(f"--scheme {MXFP4} quantizes groups of 32 input values: {name} has {inputs} inputs, not a "
                            "multiple of 32")
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
    scheme = None if options.scheme == MXFP4 else quantization_scheme(options.scheme, options.group_size)
    check_quantizable(source)
    if options.validation is not None:
        from compressor.export.exporter import check_gates_can_run, check_tasks_can_run

        validation = _validation_options(source, options)
        check_gates_can_run(validation)
        check_tasks_can_run(validation)
    check_output_location(source, output, options.overwrite)
    checkpoint = open_checkpoint(source)
    try:
        if scheme is None:
            return _quantize_mxfp4(checkpoint, source, output, options)
        return _quantize(checkpoint, source, output, scheme, options)
    except OSError as error:
        raise UserError(f"writing {output} failed: {error.strerror or error}; nothing was written") from error
    finally:
        checkpoint.close()


def _quantize(checkpoint, source: Path, output: Path, scheme, options: QuantizeOptions) -> QuantizeResult:
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    reader = checkpoint.reader
    targets = set(quantized_names(checkpoint))
    group = scheme.weights.group_size
    if group is not None:
        ragged = sorted(name for name in targets if reader.info(name).shape[1] % group)
        if ragged:
            raise UserError(f"--group-size {group} does not divide the input width of {ragged[0]} "
                            f"({reader.info(ragged[0]).shape[1]} columns); choose a divisor of every layer's width")
    fmt = infer_module_format(torch.nn.Linear, scheme)
    compressor = BaseCompressor.get_value_from_registry(fmt.value)

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

    def write_config(staging: Path) -> None:
        shutil.copyfile(source / "config.json", staging / "config.json")
        ModelCompressor(quantization_config=quant_config).update_config(str(staging))

    return _write(checkpoint, source, output, options, specs, targets, compressed, write_config, {
        "format": fmt.value, "method": "round-to-nearest (min/max)", "group_size": group, "ignored": ignore})


def _quantize_mxfp4(checkpoint, source: Path, output: Path, options: QuantizeOptions) -> QuantizeResult:
    """--scheme mxfp4: the fused experts' weights as MXFP4 blocks and scales, `quantization_config` the family's."""
    from compressor.families.quantization import MXFP4_PARTS, quantize_mxfp4

    reader, family = checkpoint.reader, checkpoint.family
    targets = set(mxfp4_names(checkpoint))
    specs = []
    for name in reader.names():
        info = reader.info(name)
        if name in targets:
            experts, inputs, outputs = info.shape
            specs += [TensorSpec(name + MXFP4_PARTS[0], torch.uint8, (experts, outputs, inputs // 32, 16)),
                      TensorSpec(name + MXFP4_PARTS[1], torch.uint8, (experts, outputs, inputs // 32))]
        else:
            specs.append(TensorSpec(name, info.dtype, info.shape))
    quantization = copy.deepcopy(family.mxfp4_quantization_config)

    def compressed(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip((name + part for part in MXFP4_PARTS), quantize_mxfp4(weight)))

    def write_config(staging: Path) -> None:
        config = {**json.loads((source / "config.json").read_text()), "quantization_config": quantization}
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return _write(checkpoint, source, output, options, specs, targets, compressed, write_config, {
        "format": MXFP4, "method": "round-to-nearest (OCP MX: scale 2^(floor(log2 max|w|) - 2) per 32 inputs, "
        "e2m1 ties to even)", "group_size": 32, "ignored": quantization.get("modules_to_not_convert", [])})


def _write(checkpoint, source: Path, output: Path, options: QuantizeOptions, specs: list[TensorSpec], targets: set,
           compressed, write_config, quantization: dict) -> QuantizeResult:
    """Write the output atomically: `compressed(name, weight)` gives each target's tensors, every other tensor is
    copied as it is; `write_config(staging)` writes config.json; `quantization` goes into the provenance."""
    from compressor.serving.check import cpu_int4_moe_problem, expert_widths

    reader, family = checkpoint.reader, checkpoint.family
    cpu_problem = cpu_int4_moe_problem(options.scheme, expert_widths(checkpoint.layout, checkpoint.config))
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
        write_config(staging)
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
            "scheme": options.scheme, **quantization, "weights_quantized": len(targets), "source": str(source),
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
