"""Task scores through lm-evaluation-harness (`lm_eval.simple_evaluate`) on models that moe-compress loads.

Tasks are found in the shipped `tasks/` folder, then in `--tasks-include` folders, then among the harness's own
tasks. Everything runs offline: a task whose data is not on this machine (shipped jsonl, or the local datasets
cache) fails with one line naming it. Relative `data_files` of local dataset builders (`dataset_path: json`, ...)
are read relative to the task's YAML file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import UserError
from compressor.gates import check_limits, parse_limits

SHIPPED_TASKS_DIR = Path(__file__).with_name("tasks")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
# the same seeds for every model evaluated (lm_eval's defaults, named so that they are recorded)
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
BOOTSTRAP_ITERS = 1000  # stderr of metrics without a closed form (acc and exact_match have one)


@dataclass(frozen=True)
class Score:
    """One task's primary metric (its first metric under its first filter) for one model."""

    metric: str  # e.g. "acc", or "exact_match,strict-match" when the task filters its outputs
    value: float
    stderr: float | None
    higher_is_better: bool
    samples: int


@dataclass
class TaskSet:
    """Tasks found and loaded once (offline): what `simple_evaluate` is given for every model."""

    names: list[str]
    include: list[str]
    leaves: list[str] = field(default_factory=list)  # the tasks scored (a group or tag stands for its tasks)
    manager: object = None


def parse_task_names(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'a,b' (or several such strings) -> ['a', 'b'], each name once."""
    parts = [text] if isinstance(text, str) else list(text or [])
    names = [name.strip() for part in parts for name in part.split(",") if name.strip()]
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _quiet():
    """lm_eval's info and warning logs and datasets' progress bars off; errors still raise."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, verbosity = logger.level, datasets.logging.get_verbosity()
    bars = datasets.utils.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool):
    """lm_eval's TaskManager over the shipped and `include` folders (and the harness's own tasks with `defaults`;
    indexing them takes seconds, so managers are kept), reading relative data files of local dataset builders
    relative to each task's YAML file (the harness would read them relative to the working directory)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(SHIPPED_TASKS_DIR), *include], include_defaults=defaults)
    factory = manager._factory  # every task, whether named, in a tag or in a group, is configured here
    configure = factory._load_full_config

    def load_full_config(entry, overrides=None):
        config = configure(entry, overrides)
        return _local_data_files(config, Path(entry.yaml_path).parent) if entry.yaml_path else config

    factory._load_full_config = load_full_config
    return manager


def _local_data_files(config: dict, base: Path) -> dict:
    """`config` with relative data_files of a local dataset builder made absolute against `base`."""
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if config.get("dataset_path") not in LOCAL_BUILDERS or files is None:
        return config

    def resolve(path):
        if isinstance(path, list):
            return [resolve(p) for p in path]
        if not isinstance(path, str) or "://" in path or Path(path).is_absolute():
            return path
        return str(base / path)

    kwargs["data_files"] = {split: resolve(p) for split, p in files.items()} if isinstance(files, dict) \
        else resolve(files)
    return {**config, "dataset_kwargs": kwargs}


def _load(manager, name: str):
    """Build one task offline (this reads its data); UserError naming the task when it cannot."""
    from compressor.io.hub_access import offline

    try:
        with _quiet(), offline():
            return manager.load([name])
    except ConnectionError as error:
        raise UserError(f"task {name!r} needs data that is not on this machine and would be downloaded (nothing is "
                        f"downloaded; put its dataset in the local datasets cache): {_first_line(error)}") from None
    except FileNotFoundError as error:
        raise UserError(f"task {name!r}: a data file is missing: {_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - the harness raises many types; name the task and what it said
        raise UserError(f"task {name!r} could not be loaded: {type(error).__name__}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def prepare_tasks(names: list[str], include: list[str] | tuple[str, ...] = ()) -> TaskSet:
    """Find every task and load its data once, before any model runs (UserError naming a task that is unknown or
    whose data is not here)."""
    names, include = parse_task_names(names), [str(d) for d in include]
    for folder in include:
        if not Path(folder).is_dir():
            raise UserError(f"--tasks-include {folder}: not a directory of lm-evaluation-harness task YAML files")
    if not names:
        raise UserError("no task named; give e.g. --tasks demo_code_next_line,demo_math_answer")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("task evaluation needs lm-evaluation-harness: pip install lm-eval") from None
    with _quiet():
        manager = _manager(tuple(include), defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = _manager(tuple(include), defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        shipped = sorted(p.stem for p in SHIPPED_TASKS_DIR.glob("*.yaml"))
        raise UserError(f"unknown task {unknown[0]!r}: not shipped ({', '.join(shipped)}), not in --tasks-include "
                        "folders and not a task of the installed lm-evaluation-harness")
    tasks = TaskSet(names=names, include=include, manager=manager)
    for name in names:
        tasks.leaves += [leaf for leaf in _load(manager, name)["tasks"] if leaf not in tasks.leaves]
    return tasks


def evaluate_tasks(model, tokenizer, tasks: TaskSet, limit: int | None = None, batch_size: int = 8) -> dict[str, Score]:
    """Every task's primary metric for `model` (a loaded causal LM, on its device) through lm_eval's HF model class,
    with fixed seeds; per leaf task (a group or tag gives its tasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from compressor.io.hub_access import offline

    with _quiet(), offline():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        results = simple_evaluate(lm, tasks=list(tasks.names), task_manager=tasks.manager, limit=limit,
                                  bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, **SEEDS)
    scores = {}
    for name, config in results["configs"].items():
        metric = config["metric_list"][0]["metric"]
        filters = config.get("filter_list") or []
        flt = filters[0]["name"] if filters and isinstance(filters[0], dict) else "none"
        values = results["results"][name]
        stderr = values.get(f"{metric}_stderr,{flt}")
        scores[name] = Score(
            metric=metric if flt == "none" else f"{metric},{flt}",
            value=float(values[f"{metric},{flt}"]),
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
            higher_is_better=bool(results["higher_is_better"][name].get(metric, True)),
            samples=int(results["n-samples"][name]["effective"]),
        )
    return scores


def task_drop(original: float, compressed: float, higher_is_better: bool) -> float:
    """How much worse the compressed model scores (absolute; negative when it scores better)."""
    return original - compressed if higher_is_better else compressed - original


def parse_task_gate(text: str | None) -> float | dict[str, float] | None:
    """'0.02' (every task) or 'gsm8k=0.02,demo_math_answer=0.05' (only those tasks); limits must be finite."""
    if text is None:
        return None
    usage = f"--max-task-drop {text!r}: give a number (0.02) or TASK=NUMBER,... (demo_math_answer=0.02)"
    return check_task_gate(parse_limits(text, usage))


def check_task_gate(gate):
    """A task gate as given (None, a number or {task: number}): every limit a finite number."""
    return check_limits(gate, "task-drop", "a finite number (e.g. 0.02: at most 2 points lower)")


def task_limits(gate, tasks) -> dict[str, float]:
    """The drop limit of each gated task (a dict gates only the tasks it names; they must be evaluated)."""
    if gate is None:
        return {}
    if not isinstance(gate, dict):
        return {name: float(gate) for name in tasks}
    unknown = sorted(set(gate) - set(tasks))
    if unknown:
        raise UserError(f"task gate names {', '.join(unknown)}, which is not evaluated (evaluated: "
                        f"{', '.join(tasks) or 'no task'})")
    return {name: float(limit) for name, limit in gate.items()}
