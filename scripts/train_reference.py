#!/usr/bin/env python
"""Train the small reference MoE models that ship in `models/`.

--family deepseek (default): the DeepSeekMoE in `models/reference/`. It has DeepSeekMoE-16B's routing
structure at small width (layer 0 dense, then MoE layers with 64 routed experts, top-6, 2 shared experts,
softmax, no renormalisation, upstream's load-balancing loss) and its own byte-level BPE tokenizer.

--family qwen3_moe: the Qwen3-MoE in `models/reference-qwen3/`, in transformers' native format
(`Qwen3MoeForCausalLM`, no custom code). It has Qwen3-30B-A3B's routing structure at small width (every
layer MoE, 128 routed experts, top-8, renormalised top-k weights, no shared expert, q/k RMSNorm, GQA) and
reuses the DeepSeekMoE reference model's tokenizer, so that both tokenize identically.

Both train on the demo domains' `train` splits.

    python scripts/train_reference.py --out models/reference            # the shipped model (~45 min, 2 cores)
    python scripts/train_reference.py --family qwen3_moe --out models/reference-qwen3 --steps 2700 \\
        --aux-loss-alpha 0.01 --threads 1                               # the shipped Qwen3-MoE (~1 h, 1 core)
    python scripts/train_reference.py --out /tmp/ref --tiny --steps 3    # smoke test (seconds), either family

Writes config.json (upstream format), model.safetensors (bf16), tokenizer files, training_log.json
and a README with the training data, steps, time, per-domain perplexity and routing specialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from compressor.data import DEMO_DOMAINS, demo_documents

REPO = Path(__file__).resolve().parents[1]
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="deepseek", help="which reference model")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-loss-alpha", type=float, default=0.001,
                        help="weight of the load-balancing loss (DeepSeek aux_loss_alpha, Qwen3 router_aux_loss_coef)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", default=",".join(DEMO_DOMAINS))
    parser.add_argument("--tiny", action="store_true", help="tiny model and data slice, for smoke tests")
    parser.add_argument("--max-documents", type=int, default=None, help="use at most this many documents per domain")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain for the report")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="qwen3_moe: copy the tokenizer of this model directory (default models/reference)")
    parser.add_argument("--experts-implementation", choices=("eager", "batched_mm", "grouped_mm"), default=None,
                        help="qwen3_moe: transformers' experts kernel for training and evaluation (default "
                             "grouped_mm, the fastest on CPU)")
    args = parser.parse_args(argv)
    if args.family != "qwen3_moe" and (args.tokenizer is not None or args.experts_implementation is not None):
        parser.error("--tokenizer and --experts-implementation apply to --family qwen3_moe only")
    return args


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


def watch_routers(model, counts_for):
    """A forward hook on every MoE layer's router (`mlp.gate` returns router logits, top-k weights, top-k
    indices) that adds the experts it picks to `counts_for(layer, n_experts)`; returns an undo."""
    handles = []
    for index, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(layer.mlp, "experts"):
            continue
        layer_counts = counts_for(index, gate.num_experts)

        def observe(module, inputs, output, _counts=layer_counts):
            _counts.add_(torch.bincount(output[2].reshape(-1), minlength=_counts.numel()).double())

        handles.append(gate.register_forward_hook(observe))

    def undo():
        for handle in handles:
            handle.remove()

    return undo


class DeepSeek:
    """The DeepSeekMoE reference (moe-compress's own modeling code, upstream checkpoint format)."""

    name = "deepseek"
    report_experts_used = False
    FULL = dict(
        vocab_size=8192, hidden_size=160, num_attention_heads=5, num_hidden_layers=5, intermediate_size=640,
        moe_intermediate_size=48, seq_len=256, batch_size=16, tokenizer_chars=4_000_000,
    )
    TINY = dict(
        vocab_size=512, hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=64,
        moe_intermediate_size=8, seq_len=32, batch_size=4, tokenizer_chars=200_000,
    )
    config_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "moe_intermediate_size", "aux_loss_alpha")

    def __init__(self, args):
        self.args = args

    def tokenizer(self, train_docs, sizes):
        return train_tokenizer(train_docs, sizes["vocab_size"], sizes["tokenizer_chars"])

    def save_tokenizer(self, tokenizer, out: Path) -> None:
        tokenizer.save_pretrained(out)

    def model_config(self, sizes, tokenizer):
        from compressor.modeling import DeepseekConfig

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
            aux_loss_alpha=self.args.aux_loss_alpha,
            seq_aux=True,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
            architectures=["DeepseekForCausalLM"],
        )

    def model(self, config):
        from compressor.modeling import DeepseekForCausalLM

        return DeepseekForCausalLM(config)

    def load(self, path: Path):
        from compressor.modeling import DeepseekForCausalLM

        return DeepseekForCausalLM.from_pretrained(path, dtype=torch.float32)

    def loss(self, model, batch):
        """(loss to minimise, loss to log, balance loss or None)."""
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        return loss, loss, None  # logged as it always was: with alpha x balance loss in it (about 1e-3)

    def log_extra(self, model) -> dict:
        return {}

    def readme_intro(self, log) -> list[str]:
        cfg = log["config"]
        return [
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
        ]

    def readme_training(self, log) -> list[str]:
        return []

    def readme_outro(self, log) -> list[str]:
        return [
            "A uniform router would give every expert 6/64 = 9.4% of tokens. Re-run: "
            f"`python scripts/train_reference.py --out models/reference --steps {log['steps']} --seed {log['seed']}`.",
        ]


class Qwen3Moe:
    """The Qwen3-MoE reference (transformers' own Qwen3MoeForCausalLM; no moe-compress modeling code)."""

    name = "qwen3_moe"
    report_experts_used = True  # how many of the 128 experts each layer uses, per domain
    NUM_EXPERTS, TOP_K = 128, 8
    # The tokenizer (8192 tokens) is the DeepSeekMoE reference's; vocab_size and tokenizer_chars are unused.
    FULL = dict(
        hidden_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=40, num_hidden_layers=5,
        moe_intermediate_size=24, seq_len=256, batch_size=16,
    )
    TINY = dict(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_hidden_layers=2,
        moe_intermediate_size=8, seq_len=32, batch_size=4,
    )
    config_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                   "router_aux_loss_coef")

    def __init__(self, args):
        self.args = args
        self.tokenizer_dir = args.tokenizer or REPO / "models" / "reference"
        self.experts_implementation = args.experts_implementation or "grouped_mm"

    def tokenizer(self, train_docs, sizes):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def save_tokenizer(self, tokenizer, out: Path) -> None:
        """The reference tokenizer's files as they are, so both reference models tokenize identically."""
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(self.tokenizer_dir / name, out / name)

    def model_config(self, sizes, tokenizer):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes["hidden_size"],
            # Dense MLP width for `mlp_only_layers`; there are none (every layer is MoE), so it is unused.
            intermediate_size=4 * sizes["hidden_size"],
            moe_intermediate_size=sizes["moe_intermediate_size"],
            num_hidden_layers=sizes["num_hidden_layers"],
            num_attention_heads=sizes["num_attention_heads"],
            num_key_value_heads=sizes["num_key_value_heads"],
            head_dim=sizes["head_dim"],
            num_experts=self.NUM_EXPERTS,
            num_experts_per_tok=self.TOP_K,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=self.args.aux_loss_alpha,
            output_router_logits=False,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            use_sliding_window=False,
            attention_bias=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            architectures=["Qwen3MoeForCausalLM"],
        )

    def model(self, config):
        from transformers import Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(config)
        model.set_experts_implementation(self.experts_implementation)
        return model

    def load(self, path: Path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, experts_implementation=self.experts_implementation
        )

    def loss(self, model, batch):
        """(loss to minimise, loss to log, balance loss): transformers adds coef x balance loss (about 8 coef);
        the log gets the cross-entropy alone."""
        out = model(input_ids=batch, labels=batch, use_cache=False, output_router_logits=True)
        return out.loss, out.loss - model.config.router_aux_loss_coef * out.aux_loss, out.aux_loss

    def log_extra(self, model) -> dict:
        parts = {"embeddings": 0, "experts": 0, "routers": 0, "attention": 0, "norms": 0}
        for name, parameter in model.named_parameters():
            part = ("embeddings" if "embed_tokens" in name or name.startswith("lm_head") else
                    "experts" if ".mlp.experts." in name else "routers" if ".mlp.gate" in name else
                    "attention" if ".self_attn." in name else "norms")
            parts[part] += parameter.numel()
        return {"family": self.name, "experts_implementation": self.experts_implementation, "parameters_by_part": parts}

    def readme_intro(self, log) -> list[str]:
        cfg = log["config"]
        experts = cfg["num_experts"]
        top_k = cfg["num_experts_per_tok"]
        return [
            "# moe-compress reference Qwen3-MoE",
            "",
            "A small Qwen3-MoE trained by `scripts/train_reference.py --family qwen3_moe`, the second reference",
            "model next to the DeepSeekMoE in `models/reference/`. It has Qwen3-30B-A3B's routing structure at",
            f"small width: all {cfg['num_hidden_layers']} layers MoE (`decoder_sparse_step` 1, no `mlp_only_layers`),"
            f" {experts} routed experts of width {cfg['moe_intermediate_size']},",
            f"top-{top_k} with renormalised top-k weights (`norm_topk_prob`), no shared expert, softmax router,"
            f" upstream's load-balancing loss (`router_aux_loss_coef` {cfg['router_aux_loss_coef']});",
            f"hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} query heads and {cfg['num_key_value_heads']}"
            f" key/value heads (GQA) of dimension {cfg['head_dim']} with q/k RMSNorm, untied embeddings.",
            f"{log['parameters'] / 1e6:.2f}M parameters, stored in bf16. The tokenizer is the DeepSeekMoE reference"
            f" model's ({cfg['vocab_size']} tokens, byte-level BPE),",
            "copied unchanged, so both reference models tokenize every text identically.",
            "",
            f"Why this size: the checkpoint is to stay near 20 MB (under 25 MB) like the DeepSeekMoE reference's, and"
            f" {experts} experts x 3 matrices",
            f"x hidden x expert width dominate it. Hidden {cfg['hidden_size']} and {cfg['num_hidden_layers']} layers"
            f" as in the DeepSeekMoE reference leave room for expert width {cfg['moe_intermediate_size']}:",
            ", ".join(f"{part} {count / 1e6:.2f}M" for part, count in log["parameters_by_part"].items()) + ".",
            "The experts are narrower relative to hidden than Qwen3-30B-A3B's (768 against 2048), which would not fit"
            f" at {experts} experts;",
            "what is kept is the routing structure: how many experts, how many chosen, how weighted, in which layers.",
            "",
            "It loads with plain transformers, no custom code and no moe-compress import:",
            "`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` (model_type `qwen3_moe`,"
            " `Qwen3MoeForCausalLM`).",
            "The experts are stored per expert (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`), as"
            " Qwen3-30B-A3B ships them;",
            "transformers fuses them into 3-D tensors when it loads the model and splits them again when it saves.",
            "bos/eos/pad ids are the tokenizer's (0, 1, 1: pad is EOS); with `pad_token_id` 1 transformers keeps the"
            " input embedding of",
            "EOS at zero, which costs nothing here: the training streams never feed EOS as input.",
        ]

    def readme_training(self, log) -> list[str]:
        return [
            f"- objective: next-token cross-entropy + {log['config']['router_aux_loss_coef']} x transformers'"
            f" load-balancing loss over all layers (final value {log['final_aux_loss']:.3f};"
            f" {log['config']['num_experts_per_tok']} would be perfectly balanced); the training loss above"
            " is the cross-entropy alone",
            f"- experts kernel: transformers' `experts_implementation=\"{log['experts_implementation']}\"`"
            " (fastest for training on this CPU of eager, batched_mm and grouped_mm)",
        ]

    def readme_outro(self, log) -> list[str]:
        cfg = log["config"]
        experts, top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
        layers = sorted(next(iter(log["evaluation"].values()))["top_expert_share"], key=int)
        lines = [
            f"A uniform router would give every expert {top_k}/{experts} = {100 * top_k / experts:.2f}% of tokens.",
            "",
            "### Most-used expert's share of tokens, per layer",
            "",
            "| domain | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for name, r in log["evaluation"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * r['top_expert_share'][layer]:.1f}%" for layer in layers)
                         + " |")
        lines += [
            "",
            "Experts that received at least one of the domain's tokens, per layer (of "
            f"{experts}): "
            + "; ".join(f"{name} {'/'.join(str(r['experts_used'][layer]) for layer in layers)}"
                        for name, r in log["evaluation"].items()) + ".",
            "",
            "Re-run: `python scripts/train_reference.py --family qwen3_moe --out models/reference-qwen3"
            f" --steps {log['steps']} --seed {log['seed']} --aux-loss-alpha {cfg['router_aux_loss_coef']}"
            f" --threads {log['threads']}`.",
        ]
        return lines


FAMILIES = {family.name: family for family in (DeepSeek, Qwen3Moe)}


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
def evaluate(model, eval_streams, seq_len, max_tokens, batch_size=8, experts_used=False):
    """Per domain: perplexity, and per MoE layer the share of tokens choosing each expert."""
    model.eval()
    results = {}
    for name, stream in eval_streams.items():
        counts = {}

        def counts_for(layer, n_experts, _counts=counts):
            return _counts.setdefault(layer, torch.zeros(n_experts, dtype=torch.float64))

        undo = watch_routers(model, counts_for)
        rows = windows(stream, seq_len, max_tokens)
        nll, tokens = 0.0, 0
        try:
            for batch in rows.split(batch_size):
                logits = model(input_ids=batch, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                nll += float(loss)
                tokens += batch[:, 1:].numel()
        finally:
            undo()
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
        if experts_used:
            results[name]["experts_used"] = {str(layer): int((c > 0).sum()) for layer, c in counts.items()}
    return results


def unigram_perplexity(train_stream, eval_stream, vocab_size):
    """Perplexity of an add-one unigram model of the domain's training tokens."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return math.exp(-float(log_probs[eval_stream].mean()))


def write_readme(out: Path, log: dict, family) -> None:
    lines = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        f"tags: [moe, {family.name}, reference-model, moe-compress]",
        "---",
        *family.readme_intro(log),
        "",
        "## Training",
        f"- data: the `train` split of the demo domains ({', '.join(log['domains'])}), built by `compressor.data`"
        " from installable packages (see the project README); batches mix the domains equally",
        f"- {log['steps']} steps x {log['batch_size']} sequences x {log['seq_len']} tokens"
        f" = {log['steps'] * log['batch_size'] * log['seq_len'] / 1e6:.1f}M tokens; AdamW, lr {log['lr']}, cosine schedule, seed {log['seed']}",
        f"- wall time {log['train_seconds'] / 60:.1f} min on {log['threads']} CPU threads"
        f" ({log['tokens_per_second']:.0f} tokens/s); final training loss {log['final_loss']:.3f}",
        *family.readme_training(log),
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
    lines += ["", *family.readme_outro(log), ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    family = FAMILIES[args.family](args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    sizes = family.TINY if args.tiny else family.FULL
    domains = [d for d in args.domains.split(",") if d]
    max_documents = args.max_documents or (20 if args.tiny else None)

    started = time.time()
    train_docs = load_documents(domains, "train", max_documents)
    eval_docs = load_documents(domains, "evaluation", max_documents)
    tokenizer = family.tokenizer(train_docs, sizes)
    train_streams = {name: token_stream(tokenizer, docs) for name, docs in train_docs.items()}
    eval_streams = {name: token_stream(tokenizer, docs) for name, docs in eval_docs.items()}
    for name, stream in train_streams.items():
        print(f"{name}: {len(stream):,} train tokens, {len(eval_streams[name]):,} evaluation tokens", file=sys.stderr)
    print(f"data + tokenizer: {time.time() - started:.0f}s", file=sys.stderr)

    config = family.model_config(sizes, tokenizer)
    model = family.model(config)
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
    losses, aux_losses = [], []
    train_start = time.time()
    progress = tqdm(range(args.steps), desc="training", unit="step", disable=None)
    for step in progress:
        batch = sample_batch(train_streams, domains, sizes["batch_size"], sizes["seq_len"], generator)
        loss, lm_loss, aux_loss = family.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(lm_loss.item())
        if aux_loss is not None:
            aux_losses.append(aux_loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if progress.disable and (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps}  loss {sum(losses[-100:]) / 100:.3f}  "
                  f"{time.time() - train_start:.0f}s", file=sys.stderr, flush=True)
    train_seconds = time.time() - train_start

    args.out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(args.out)
    family.save_tokenizer(tokenizer, args.out)
    reloaded = family.load(args.out)
    evaluation = evaluate(reloaded, eval_streams, sizes["seq_len"], args.eval_tokens,
                          experts_used=family.report_experts_used)
    for name, result in evaluation.items():
        result["unigram_perplexity"] = unigram_perplexity(
            train_streams[name], eval_streams[name][: result["tokens"]], len(tokenizer)
        )
    log = {
        **family.log_extra(model),
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
        "config": {k: getattr(config, k) for k in family.config_keys},
        "evaluation": evaluation,
    }
    if aux_losses:
        log["final_aux_loss"] = sum(aux_losses[-50:]) / len(aux_losses[-50:])
        log["aux_loss_curve"] = [round(sum(aux_losses[i : i + 50]) / len(aux_losses[i : i + 50]), 4)
                                 for i in range(0, len(aux_losses), 50)]
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_readme(args.out, log, family)
    for name, r in evaluation.items():
        print(
            f"{name:8s} ppl {r['perplexity']:8.2f}  unigram {r['unigram_perplexity']:8.1f}  "
            f"top expert {100 * r['max_top_expert_share']:.1f}% (layer {r['max_top_expert_layer']})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
