"""llm-compressor's REAP expert pruning on a local checkpoint, for benchmarks/peers.py.

    $LLMCOMPRESSOR_VENV/bin/python benchmarks/peers_reap_runner.py MODEL CALIBRATION.jsonl OUT \
        [--sparsity 0.5] [--seq-len 256] [--batch-size 8] [--threads 1] [--report REPORT.json]

Runs in the llm-compressor venv (scripts/setup_llmcompressor.sh), never in the project's: it imports nothing of
moe-compress. CALIBRATION.jsonl has one pre-tokenized sequence per line (`{"input_ids": [...]}`), the same rows
moe-compress profiles; they are handed to `oneshot` as a `datasets.Dataset` with an `input_ids` column, which
llm-compressor uses as given (no tokenization), every row once, in file order (no shuffling, no subsampling).
`oneshot(recipe=REAPPruningModifier(sparsity=...))` loads MODEL with transformers, accumulates REAP saliency
during its calibration pass, drops the lowest-saliency experts of every MoE layer and saves OUT. REPORT.json gets
the kept expert ids per layer (REAP's own `report_path`) plus the phases' wall times.

Everything is local: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def causal_dataloader(rows: list[list[int]], batch_size: int, torch):
    """The rows in order as a DataLoader whose batches carry `attention_mask` as a 4-D additive causal mask
    ([batch, 1, seq, seq], 0 where attended, the dtype's minimum elsewhere: what transformers' eager mask is).
    transformers' `create_causal_mask` returns a 4-D mask as given, before it looks at the attention
    implementation, so the decoder layers get a causal mask even when the config it is handed has lost it."""

    def collate(batch):
        ids = torch.tensor(batch, dtype=torch.long)
        length = ids.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return {"input_ids": ids, "attention_mask": mask.expand(len(batch), 1, length, length).contiguous()}

    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("calibration", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="auto", help="oneshot's precision (auto: the checkpoint's dtype)")
    parser.add_argument("--calibrate-all-experts", action="store_true",
                        help="oneshot's moe_calibrate_all_experts (default off: REAP does not need it and says so)")
    parser.add_argument("--no-propagate-error", action="store_true",
                        help="oneshot's propagate_error=False: each layer's saliency on the unpruned model's hidden "
                             "states (default: llm-compressor's, the outputs of the already-pruned layers below)")
    parser.add_argument("--causal-mask-in-data", action="store_true",
                        help="workaround: hand oneshot a DataLoader whose batches carry a 4-D additive causal mask "
                             "(llm-compressor 0.14's sequential pipeline otherwise calibrates this model with "
                             "bidirectional attention, see benchmarks/peers.py)")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.out.exists():
        print(f"error: {args.out} exists", file=sys.stderr)
        return 2

    started = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import REAPPruningModifier

    imported = time.perf_counter()
    rows = [json.loads(line)["input_ids"] for line in args.calibration.read_text().splitlines() if line.strip()]
    if args.causal_mask_in_data:
        dataset = causal_dataloader(rows, args.batch_size, torch)
    else:
        dataset = Dataset.from_dict({"input_ids": rows})
    kept_path = args.out.parent / f".{args.out.name}.reap-kept.json"
    oneshot(
        model=str(args.model),
        dataset=dataset,
        recipe=REAPPruningModifier(sparsity=args.sparsity, report_path=str(kept_path)),
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,
        max_seq_length=args.seq_len,
        batch_size=args.batch_size,
        precision=args.precision,
        moe_calibrate_all_experts=args.calibrate_all_experts,
        output_dir=str(args.out),
        **({"propagate_error": False} if args.no_propagate_error else {}),
    )
    finished = time.perf_counter()
    kept = json.loads(kept_path.read_text())
    kept_path.unlink()
    if args.report is not None:
        args.report.write_text(json.dumps({
            "kept": kept,
            "calibration": {"sequences": len(rows), "tokens": sum(len(r) for r in rows)},
            "seconds": {"imports": imported - started, "oneshot": finished - imported},
            "torch_threads": torch.get_num_threads(),
            "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "llmcompressor")},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
