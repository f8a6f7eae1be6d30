#!/usr/bin/env python
"""Train the small reference DeepSeekMoE that ships in `models/reference/`.

It has DeepSeekMoE-16B's routing structure at small width (layer 0 dense, then MoE layers with
64 routed experts, top-6, 2 shared experts, softmax, no renormalisation, upstream's load-balancing
loss) and its own byte-level BPE tokenizer, trained on the demo domains' `train` splits.

    python scripts/train_reference.py --out models/reference            # the shipped model (~45 min, 2 cores)
    python scripts/train_reference.py --out /tmp/ref --tiny --steps 3    # smoke test (seconds)

Writes config.json (upstream format), model.safetensors (bf16), tokenizer files, training_log.json
and a README with the training data, steps, time, per-domain perplexity and routing specialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from compressor.data import DEMO_DOMAINS, demo_documents
from compressor.modeling import DeepseekConfig, DeepseekForCausalLM

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

FULL = dict(
    vocab_size=8192, hidden_size=160, num_attention_heads=5, num_hidden_layers=5, intermediate_size=640,
    moe_intermediate_size=48, seq_len=256, batch_size=16, tokenizer_chars=4_000_000,
)
TINY = dict(
    vocab_size=512, hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=64,
    moe_intermediate_size=8, seq_len=32, batch_size=4, tokenizer_chars=200_000,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-loss-alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", default=",".join(DEMO_DOMAINS))
    parser.add_argument("--tiny", action="store_true", help="tiny model and data slice, for smoke tests")
    parser.add_argument("--max-documents", type=int, default=None, help="use at most this many documents per domain")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain for the report")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def load_documents(domains, split, max_documents):
    return {name: demo_documents(name, split)[:max_documents] for name in domains}


def train_tokenizer(train_docs, vocab_size, char_budget) -> PreTrainedTokenizerFast:
    """Byte-level BPE on an equal character budget per domain; prepends BOS like DeepSeek's tokenizer."""
    per_domain = char_budget // len(train_docs)

    def corpus():
        for docs in train_docs.values():
            used = 0
            for doc in docs:
                if used >= per_domain:
                    break
                used += len(doc)
                yield doc

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=4096
    )


def token_stream(tokenizer, docs) -> torch.Tensor:
    """All documents as one stream: BOS + tokens of each document."""
    encoded = tokenizer(docs, add_special_tokens=True)["input_ids"]
    return torch.tensor(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded]))


def model_config(sizes, tokenizer, aux_loss_alpha) -> DeepseekConfig:
    return DeepseekConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        moe_intermediate_size=sizes["moe_intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_attention_heads"],
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=aux_loss_alpha,
        seq_aux=True,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        architectures=["DeepseekForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModel": "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
    )


def sample_batch(streams, names, batch_size, seq_len, generator):
    """Random windows, domains taken in turn so every batch mixes all domains equally."""
    rows = []
    for i in range(batch_size):
        stream = streams[names[i % len(names)]]
        start = int(torch.randint(0, len(stream) - seq_len, (1,), generator=generator))
        rows.append(stream[start : start + seq_len])
    return torch.stack(rows)


def windows(stream, seq_len, max_tokens):
    n = min(len(stream), max_tokens) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def evaluate(model, eval_streams, seq_len, max_tokens, batch_size=8):
    """Per domain: perplexity, and per MoE layer the share of tokens choosing each expert."""
    model.eval()

    def observer_for(layer_counts):
        def observe(_module, _inputs, output):  # the router returns (logits, top-k weights, top-k indices)
            layer_counts.add_(torch.bincount(output[2].reshape(-1), minlength=layer_counts.numel()).double())

        return observe

    results = {}
    moe_layers = {index: layer.mlp.gate for index, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}
    for name, stream in eval_streams.items():
        counts = {index: torch.zeros(gate.num_experts, dtype=torch.float64) for index, gate in moe_layers.items()}
        hooks = [gate.register_forward_hook(observer_for(counts[index])) for index, gate in moe_layers.items()]
        rows = windows(stream, seq_len, max_tokens)
        nll, tokens = 0.0, 0
        for batch in rows.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            tokens += batch[:, 1:].numel()
        for hook in hooks:
            hook.remove()
        routed_tokens = rows.numel()
        top_share = {str(layer): float(c.max() / routed_tokens) for layer, c in counts.items()}
        best_layer = max(top_share, key=top_share.get)
        results[name] = {
            "perplexity": math.exp(nll / tokens),
            "tokens": tokens,
            "top_expert_share": top_share,
            "max_top_expert_share": top_share[best_layer],
            "max_top_expert_layer": int(best_layer),
        }
    return results


def unigram_perplexity(train_stream, eval_stream, vocab_size):
    """Perplexity of an add-one unigram model of the domain's training tokens."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return math.exp(-float(log_probs[eval_stream].mean()))


def write_readme(out: Path, log: dict) -> None:
    cfg = log["config"]
    lines = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        "tags: [moe, deepseek, reference-model, moe-compress]",
        "---",
        "# moe-compress reference DeepSeekMoE",
        "",
        "A small DeepSeekMoE trained by `scripts/train_reference.py` so that moe-compress's demo, tests and",
        "benchmarks have a real, trained mixture-of-experts model to work on. It has DeepSeekMoE-16B's routing",
        f"structure at small width: {cfg['num_hidden_layers']} layers (layer 0 dense, the rest MoE), 64 routed experts of",
        f"width {cfg['moe_intermediate_size']}, top-6, 2 shared experts (one MLP of width {2 * cfg['moe_intermediate_size']}),",
        "softmax routing without renormalisation, upstream's sequence-level balance loss "
        f"(alpha {cfg['aux_loss_alpha']}); hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads,",
        f"own byte-level BPE tokenizer ({cfg['vocab_size']} tokens). {log['parameters'] / 1e6:.2f}M parameters, stored in bf16.",
        "",
        "It loads with `import compressor` + `AutoModelForCausalLM.from_pretrained` (model_type `deepseek`, upstream format).",
        "",
        "## Training",
        f"- data: the `train` split of the demo domains ({', '.join(log['domains'])}), built by `compressor.data`"
        " from installable packages (see the project README); batches mix the domains equally",
        f"- {log['steps']} steps x {log['batch_size']} sequences x {log['seq_len']} tokens"
        f" = {log['steps'] * log['batch_size'] * log['seq_len'] / 1e6:.1f}M tokens; AdamW, lr {log['lr']}, cosine schedule, seed {log['seed']}",
        f"- wall time {log['train_seconds'] / 60:.1f} min on {log['threads']} CPU threads"
        f" ({log['tokens_per_second']:.0f} tokens/s); final training loss {log['final_loss']:.3f}",
        "",
        "## Held-out evaluation (the `evaluation` split, bf16 weights)",
        "",
        "| domain | tokens | perplexity | unigram baseline | most-used expert's share of tokens (max over layers, layer) |",
        "|---|---|---|---|---|",
    ]
    for name, r in log["evaluation"].items():
        lines.append(
            f"| {name} | {r['tokens']} | {r['perplexity']:.2f} | {r['unigram_perplexity']:.1f} |"
            f" {100 * r['max_top_expert_share']:.1f}% (layer {r['max_top_expert_layer']}) |"
        )
    lines += [
        "",
        "A uniform router would give every expert 6/64 = 9.4% of tokens. Re-run: "
        f"`python scripts/train_reference.py --out models/reference --steps {log['steps']} --seed {log['seed']}`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    sizes = TINY if args.tiny else FULL
    domains = [d for d in args.domains.split(",") if d]
    max_documents = args.max_documents or (20 if args.tiny else None)

    started = time.time()
    train_docs = load_documents(domains, "train", max_documents)
    eval_docs = load_documents(domains, "evaluation", max_documents)
    tokenizer = train_tokenizer(train_docs, sizes["vocab_size"], sizes["tokenizer_chars"])
    train_streams = {name: token_stream(tokenizer, docs) for name, docs in train_docs.items()}
    eval_streams = {name: token_stream(tokenizer, docs) for name, docs in eval_docs.items()}
    for name, stream in train_streams.items():
        print(f"{name}: {len(stream):,} train tokens, {len(eval_streams[name]):,} evaluation tokens", file=sys.stderr)
    print(f"data + tokenizer: {time.time() - started:.0f}s", file=sys.stderr)

    config = model_config(sizes, tokenizer, args.aux_loss_alpha)
    model = DeepseekForCausalLM(config)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, min(100, args.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, args.steps))))),
    )
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    train_start = time.time()
    progress = tqdm(range(args.steps), desc="training", unit="step", disable=None)
    for step in progress:
        batch = sample_batch(train_streams, domains, sizes["batch_size"], sizes["seq_len"], generator)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if progress.disable and (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps}  loss {sum(losses[-100:]) / 100:.3f}  "
                  f"{time.time() - train_start:.0f}s", file=sys.stderr, flush=True)
    train_seconds = time.time() - train_start

    args.out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    reloaded = DeepseekForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    evaluation = evaluate(reloaded, eval_streams, sizes["seq_len"], args.eval_tokens)
    for name, result in evaluation.items():
        result["unigram_perplexity"] = unigram_perplexity(
            train_streams[name], eval_streams[name][: result["tokens"]], len(tokenizer)
        )
    log = {
        "domains": domains,
        "steps": args.steps,
        "batch_size": sizes["batch_size"],
        "seq_len": sizes["seq_len"],
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "parameters": parameters,
        "train_seconds": train_seconds,
        "tokens_per_second": args.steps * sizes["batch_size"] * sizes["seq_len"] / max(train_seconds, 1e-9),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "loss_curve": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)],
        "train_tokens": {name: len(stream) for name, stream in train_streams.items()},
        "config": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "moe_intermediate_size", "aux_loss_alpha")},
        "evaluation": evaluation,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_readme(args.out, log)
    for name, r in evaluation.items():
        print(
            f"{name:8s} ppl {r['perplexity']:8.2f}  unigram {r['unigram_perplexity']:8.1f}  "
            f"top expert {100 * r['max_top_expert_share']:.1f}% (layer {r['max_top_expert_layer']})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
