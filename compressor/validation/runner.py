"""Compare an original and a compressed model on identical held-out tokens.

Per domain: perplexity of both, relative increase, mean next-token KL(original || compressed), top-1
next-token agreement. Per decoder layer: cosine similarity of the residual stream after the layer (mean
and 5th percentile over tokens). `layerwise=True` runs both models one decoder layer at a time in
lockstep, so a big model is never held twice (or even once) in memory.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from compressor import __version__
from compressor.data.batching import batches, token_sequences
from compressor.data.sources import load_source
from compressor.errors import UserError
from compressor.families import open_checkpoint, quantization
from compressor.gates import check_limits, parse_limits
from compressor.io.resolve import resolve_model
from compressor.runtime import (
    CheckpointTensors, ForwardOptions, LayerwiseModel, load_tokenizer, resolve_device, resolve_dtype,
    run_layer_by_layer,
)
from compressor.profiling.schema import config_hash
from compressor.validation.schema import (
    DomainResult, LayerResult, ModelRef, TaskResult, Thresholds, Throughput, ValidationReport,
)


@dataclass
class ValidateOptions:
    max_tokens: int = 16384
    forward: ForwardOptions = field(default_factory=ForwardOptions)
    max_ppl_increase: float | dict[str, float] | None = None  # one limit for all domains, or per domain
    min_cosine: float | None = None
    tasks: tuple[str, ...] = ()  # lm-evaluation-harness tasks (shipped, in `tasks_include` folders or installed)
    task_limit: int | None = None  # documents per task (the first ones), the same for both models
    tasks_include: tuple[str, ...] = ()
    max_task_drop: float | dict[str, float] | None = None  # absolute, for every task or {task: limit}
    default_split: str = "evaluation"
    progress: bool = True
    revisions: tuple[str | None, str | None] = field(default=(None, None))


class _DomainAccumulator:
    def __init__(self):
        self.nll_original = self.nll_compressed = self.kl = 0.0
        self.agree = self.tokens = 0

    def add(self, logits_original, logits_compressed, input_ids, attention_mask):
        targets = input_ids[:, 1:]
        keep = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
        lo = torch.log_softmax(logits_original[:, :-1].float(), dim=-1)[keep]
        lc = torch.log_softmax(logits_compressed[:, :-1].float(), dim=-1)[keep]
        t = targets[keep]
        self.nll_original -= float(lo.gather(-1, t[:, None]).double().sum())
        self.nll_compressed -= float(lc.gather(-1, t[:, None]).double().sum())
        self.kl += float((lo.exp() * (lo - lc)).sum(-1).double().sum())
        self.agree += int((lo.argmax(-1) == lc.argmax(-1)).sum())
        self.tokens += int(keep.sum())

    def result(self, source: dict) -> DomainResult:
        n = max(self.tokens, 1)
        po, pc = _exp(self.nll_original / n), _exp(self.nll_compressed / n)
        return DomainResult(tokens=self.tokens, source=source, perplexity_original=po, perplexity_compressed=pc,
                            perplexity_increase=pc / po - 1, kl_mean=self.kl / n, top1_agreement=self.agree / n)


def _exp(x: float) -> float:
    """exp that gives inf instead of raising OverflowError (and nan for nan)."""
    return math.exp(x) if x < 709 or math.isnan(x) else math.inf


def _cosines(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    hidden = a.shape[-1]
    return torch.nn.functional.cosine_similarity(
        a.reshape(-1, hidden)[valid].float(), b.reshape(-1, hidden)[valid].float(), dim=-1, eps=1e-12
    ).cpu()


def _model_ref(source: str, checkpoint) -> ModelRef:
    reader = checkpoint.reader
    return ModelRef(source=source, family=checkpoint.family.name, config_hash=config_hash(reader.config, checkpoint.family.top_k_key),
                    parameters=reader.total_parameters, bytes=reader.total_bytes)


def _file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _check_related(original_dir: Path, compressed_dir: Path, a: dict, b: dict) -> None:
    if a.get("vocab_size") != b.get("vocab_size"):
        raise UserError(f"the two models are unrelated: vocabulary sizes differ ({a.get('vocab_size')} vs "
                        f"{b.get('vocab_size')})")
    for key in ("hidden_size", "num_hidden_layers"):
        if a.get(key) != b.get(key):
            raise UserError(f"the two models are unrelated: {key} differs ({a.get(key)} vs {b.get(key)})")
    ta, tb = _file_hash(original_dir / "tokenizer.json"), _file_hash(compressed_dir / "tokenizer.json")
    if ta and tb and ta != tb:
        raise UserError("the two models are unrelated: their tokenizer.json files differ")


def ppl_limits(gate: float | dict[str, float] | None, domains) -> dict[str, float]:
    """The perplexity-increase limit of each gated domain (a dict gates only the domains it names)."""
    if gate is None:
        return {}
    if not isinstance(gate, dict):
        return {name: float(gate) for name in domains}
    unknown = sorted(set(gate) - set(domains))
    if unknown:
        raise UserError(f"perplexity gate names domain(s) {', '.join(unknown)} that are not validated "
                        f"(validated: {', '.join(domains)})")
    return {name: float(limit) for name, limit in gate.items()}


def parse_ppl_gate(text: str | None) -> float | dict[str, float] | None:
    """'0.05' (every domain) or 'code=0.05,math=0.05,english=0.5' (only those domains); limits must be finite."""
    if text is None:
        return None
    usage = f"--max-ppl-increase {text!r}: give a number (0.05) or NAME=NUMBER,... (code=0.05,english=0.5)"
    return check_ppl_gate(parse_limits(text, usage))


def check_ppl_gate(gate):
    """A perplexity gate as given (None, a number or {domain: number}): every limit finite and > -1."""
    return check_limits(gate, "perplexity-increase", "a finite number above -1 (e.g. 0.05 for +5%)",
                        lambda limit: limit > -1)


def check_cosine_gate(limit: float | None) -> float | None:
    """A hidden-state cosine gate: a finite number in [-1, 1], or None."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not math.isfinite(limit) or not -1 <= limit <= 1):
        raise UserError(f"--min-cosine must be a number between -1 and 1, not {limit!r}")
    return limit


def validate_models(original: str, compressed: str, sources: dict[str, str],
                    options: ValidateOptions | None = None) -> ValidationReport:
    """Compare `compressed` with `original` on each NAME=SOURCE (default split: evaluation)."""
    options = options or ValidateOptions()
    forward = options.forward
    device, dtype = resolve_device(forward.device), resolve_dtype(forward.dtype)
    loaded = {name: load_source(spec, default_split=options.default_split, text_field=forward.text_field)
              for name, spec in sources.items()}
    check_ppl_gate(options.max_ppl_increase)
    check_cosine_gate(options.min_cosine)
    ppl_limits(options.max_ppl_increase, loaded)  # fail fast on a gate for a domain that is not validated
    task_set = prepare_task_set(options)
    if not loaded and task_set is None:
        raise UserError("nothing to validate: give held-out data (-d NAME=SOURCE) and/or tasks (--tasks)")
    if not loaded and (options.max_ppl_increase is not None or options.min_cosine is not None):
        raise UserError("perplexity and cosine gates need held-out data (-d NAME=SOURCE)")
    original_dir, _ = resolve_model(original, options.revisions[0])
    compressed_dir, _ = resolve_model(compressed, options.revisions[1])
    checkpoints = open_checkpoint(original_dir), open_checkpoint(compressed_dir, quantized=True)
    if forward.layerwise and quantization.method(checkpoints[1].config) == quantization.COMPRESSED_TENSORS:
        raise UserError(f"{compressed} is quantized: validate it whole (without --layerwise)")
    configs = checkpoints[0].config, checkpoints[1].config
    _check_related(original_dir, compressed_dir, *configs)
    tokenizer = None
    if task_set is not None or any(not s.pretokenized for s in loaded.values()):
        tokenizer = load_tokenizer(original_dir) or load_tokenizer(compressed_dir)
    if task_set is not None and tokenizer is None:
        raise UserError("task evaluation needs a tokenizer, and neither model directory has one")
    vocab = int(configs[0]["vocab_size"])
    work = []
    for name, source in loaded.items():
        sequences = token_sequences(source, tokenizer, forward.seq_len, options.max_tokens)
        if not sequences or max(len(s) for s in sequences) < 2:
            raise UserError(f"domain {name!r} has too few tokens to measure perplexity")
        if max(max(s) for s in sequences) >= vocab:
            raise UserError(f"domain {name!r} has token ids outside the vocabulary of {vocab}")
        pad = int(getattr(tokenizer, "pad_token_id", None) or 0) if tokenizer is not None else 0
        work += [(name, batch) for batch in batches(sequences, forward.batch_size, pad)]

    accumulators = {name: _DomainAccumulator() for name in loaded}
    layer_cosines: dict[int, list[torch.Tensor]] = {}
    run = _run_layerwise if forward.layerwise else _run_whole
    throughput = run(checkpoints, work, accumulators, layer_cosines, device, dtype, options) if work else None
    tasks = {} if task_set is None else _run_tasks(checkpoints, tokenizer, task_set, device, dtype, options)
    for checkpoint in checkpoints:
        checkpoint.close()

    layers = {}
    for layer, parts in sorted(layer_cosines.items()):
        values = torch.cat(parts).double()
        layers[str(layer)] = LayerResult(cosine_mean=float(values.mean()),
                                         cosine_p5=float(torch.quantile(values, 0.05)))
    domains = {name: acc.result(loaded[name].description()) for name, acc in accumulators.items()}
    failures = gate_failures(domains, layers, options.max_ppl_increase, options.min_cosine, tasks,
                             options.max_task_drop)
    settings = {"max_tokens": options.max_tokens, "seq_len": forward.seq_len, "batch_size": forward.batch_size,
                "dtype": str(dtype).removeprefix("torch."), "layerwise": forward.layerwise}
    if task_set is not None:
        settings["tasks"] = _task_settings(task_set, options)
    return ValidationReport(
        tool_version=__version__,
        original=_model_ref(original, checkpoints[0]),
        compressed=_model_ref(compressed, checkpoints[1]),
        settings=settings,
        thresholds=Thresholds(max_ppl_increase=options.max_ppl_increase, min_cosine=options.min_cosine,
                              max_task_drop=options.max_task_drop),
        domains=domains, layers=layers, throughput=throughput, tasks=tasks, passed=not failures, failures=failures,
    )


def prepare_task_set(options: ValidateOptions):
    """The tasks found and their data loaded (before any model runs), or None without tasks; the task gate and
    limit checked."""
    from compressor.evaluation.harness import check_task_gate, prepare_tasks, task_limits

    check_task_gate(options.max_task_drop)
    if options.task_limit is not None and (isinstance(options.task_limit, bool) or
                                           not isinstance(options.task_limit, int) or options.task_limit < 1):
        raise UserError(f"the task limit must be a whole number of documents (1 or more), not {options.task_limit!r}")
    if not options.tasks:
        if options.max_task_drop is not None:
            raise UserError("a task-drop gate was given but no task is evaluated (name tasks with --tasks)")
        return None
    task_set = prepare_tasks(list(options.tasks), options.tasks_include)
    task_limits(options.max_task_drop, task_set.leaves)  # fail fast on a gate for a task that is not evaluated
    return task_set


def _task_settings(task_set, options: ValidateOptions) -> dict:
    from importlib.metadata import version

    from compressor.evaluation.harness import SEEDS

    return {"names": task_set.names, "limit": options.task_limit, "include": list(task_set.include),
            "seeds": SEEDS, "lm_eval": version("lm-eval")}


def _run_tasks(checkpoints, tokenizer, task_set, device, dtype, options) -> dict[str, TaskResult]:
    """Both models through the harness, one after the other (one whole model in memory at a time)."""
    from compressor.evaluation.harness import evaluate_tasks

    scores = []
    for c in checkpoints:
        model = c.family.model_class(c.config).from_pretrained(c.reader.path, dtype=dtype).to(device).eval()
        scores.append(evaluate_tasks(model, tokenizer, task_set, options.task_limit, options.forward.batch_size))
        del model
    return {name: TaskResult(metric=a.metric, original=a.value, original_stderr=a.stderr, compressed=b.value,
                             compressed_stderr=b.stderr, change=b.value - a.value,
                             higher_is_better=a.higher_is_better, samples=a.samples)
            for name, a in scores[0].items() for b in [scores[1][name]]}


def gate_failures(domains: dict[str, DomainResult], layers: dict[str, LayerResult], max_ppl_increase,
                  min_cosine, tasks: dict[str, TaskResult] | None = None, max_task_drop=None) -> list[str]:
    """What fails the gates. A measurement that is not a finite number (NaN weights, overflow) always fails, with
    or without a gate: a model that computes NaN is broken."""
    failures = []
    for name, d in domains.items():
        if not all(map(math.isfinite, (d.perplexity_original, d.perplexity_compressed, d.kl_mean))):
            failures.append(f"{name}: perplexity or KL is not a finite number (original {d.perplexity_original}, "
                            f"compressed {d.perplexity_compressed}, KL {d.kl_mean})")
    for layer, result in layers.items():
        if not math.isfinite(result.cosine_mean):
            failures.append(f"layer {layer}: hidden-state cosine is not a finite number")
    for name, limit in ppl_limits(max_ppl_increase, domains).items():
        increase = domains[name].perplexity_increase
        if math.isfinite(increase) and increase > limit:
            failures.append(f"{name}: perplexity {100 * increase:+.1f}% exceeds {100 * limit:+.1f}%")
    if min_cosine is not None:
        failures += [f"layer {layer}: hidden-state cosine {r.cosine_mean:.4f} is below {min_cosine}"
                     for layer, r in layers.items() if math.isfinite(r.cosine_mean) and r.cosine_mean < min_cosine]
    return failures + task_gate_failures(tasks or {}, max_task_drop)


def task_gate_failures(tasks: dict[str, TaskResult], max_task_drop) -> list[str]:
    """A task score that is not a finite number always fails; a gated task fails when it drops more than its
    limit (absolute, in the direction of the task's better score)."""
    from compressor.evaluation.harness import task_drop, task_limits

    failures = [f"task {name}: score is not a finite number (original {t.original}, compressed {t.compressed})"
                for name, t in tasks.items() if not (math.isfinite(t.original) and math.isfinite(t.compressed))]
    for name, limit in task_limits(max_task_drop, tasks).items():
        t = tasks[name]
        drop = task_drop(t.original, t.compressed, t.higher_is_better)
        if math.isfinite(drop) and drop > limit:
            failures.append(f"task {name}: {t.metric} {t.original:.4f} -> {t.compressed:.4f} drops {drop:.4f}, "
                            f"more than {limit}")
    return failures


def _run_whole(checkpoints, work, accumulators, layer_cosines, device, dtype, options):
    models = [c.family.model_class(c.config).from_pretrained(c.reader.path, dtype=dtype).to(device).eval()
              for c in checkpoints]
    total = sum(batch.tokens for _, batch in work)
    seconds, timed = [0.0, 0.0], 0
    with torch.no_grad(), tqdm(total=total, desc="validate", unit="tok", unit_scale=True,
                               disable=not options.progress, dynamic_ncols=True) as bar:
        for index, (name, batch) in enumerate(work):
            ids = batch.input_ids.to(device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            outputs = [None, None]
            # the first batch warms both models up (untimed); then the model that runs first alternates
            for i in (0, 1) if index % 2 == 0 else (1, 0):
                _synchronize(device)
                start = time.perf_counter()
                outputs[i] = models[i](input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
                _synchronize(device)
                if index > 0 or len(work) == 1:
                    seconds[i] += time.perf_counter() - start
            timed += batch.tokens if index > 0 or len(work) == 1 else 0
            accumulators[name].add(outputs[0].logits, outputs[1].logits, ids, mask)
            valid = batch.valid().to(device)
            for layer, (a, b) in enumerate(zip(outputs[0].hidden_states[1:], outputs[1].hidden_states[1:])):
                layer_cosines.setdefault(layer, []).append(_cosines(a, b, valid))
            bar.update(batch.tokens)
    return Throughput(original_tokens_per_second=timed / seconds[0], compressed_tokens_per_second=timed / seconds[1],
                      device=str(device), threads=torch.get_num_threads())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_layerwise(checkpoints, work, accumulators, layer_cosines, device, dtype, options):
    runners = [LayerwiseModel(c.family, c.config, CheckpointTensors(c.reader, c.layout), device, dtype)
               for c in checkpoints]

    def after(step):
        for i, (_, batch) in enumerate(work):
            valid = batch.valid().to(device)
            layer_cosines.setdefault(step.layer, []).append(
                _cosines(step.stores[0].get(i, device), step.stores[1].get(i, device), valid))

    stores = run_layer_by_layer(runners, [batch for _, batch in work], after=after, desc="validate (layer by layer)",
                                progress=options.progress)
    try:
        heads = [runner.load_head() for runner in runners]
        with torch.no_grad():
            for i, (name, batch) in enumerate(work):
                mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
                logits = [head(store.get(i, device)) for head, store in zip(heads, stores)]
                accumulators[name].add(logits[0], logits[1], batch.input_ids.to(device), mask)
    finally:
        for store in stores:
            store.close()
    return None  # layer-by-layer timings include loading layers: no throughput to report
