"""DeepSeekMoE (model_type ``deepseek``) for transformers 5, in transformers' own MoE conventions.

Loads upstream checkpoints (``deepseek-ai/deepseek-moe-16b-*``) with their on-disk tensor names unchanged:
per-expert ``mlp.experts.E.{gate,up,down}_proj`` on disk become fused ``mlp.experts.gate_up_proj`` [E, 2I, H]
and ``mlp.experts.down_proj`` [E, H, I] in memory through a registered checkpoint conversion (the one
transformers uses for Qwen2-MoE), and `save_pretrained` writes them back per expert. The experts run through
transformers' expert kernels (`experts_implementation`: ``eager``, ``batched_mm``, ``grouped_mm``), attention
through its attention interface (``eager``, ``sdpa``, ...).

Routing follows upstream: router logits and softmax in fp32 over all routed experts, top-k, and the chosen
weights renormalised when ``norm_topk_prob`` is true (for every k, as vLLM does, so that a top-1 checkpoint
means the same in both runtimes); the routed sum is added to the shared experts' output. Differences from
upstream's remote code: per-layer expert counts (``n_routed_experts_per_layer``).

Self-contained (imports only torch and transformers), so it can be copied into a checkpoint directory and
loaded with ``trust_remote_code=True``; importing it registers the checkpoint conversion for model_type
``deepseek`` (remote code has no other place to do that). Part of moe-compress.
"""

import inspect
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:
    from .configuration_deepseek import DeepseekConfig
except ImportError:  # loaded as a top-level module
    from configuration_deepseek import DeepseekConfig

# transformers renamed the cache field of model outputs and the mask argument from `past_key_values` to `cache`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

register_checkpoint_conversion_mapping(
    "deepseek",
    [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ],
    overwrite=True,
)


class DeepseekRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DeepseekRotaryEmbedding(nn.Module):
    """Rotary embedding with upstream's `linear` and `dynamic` (NTK) scaling, through transformers' RoPE functions."""

    def __init__(self, config: DeepseekConfig, device=None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init(config, device)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs):
        dim = config.hidden_size // config.num_attention_heads
        base = config.rope_parameters["rope_theta"]
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (base**exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class DeepseekMLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts (one MLP)."""

    def __init__(self, config: DeepseekConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class DeepseekExperts(nn.Module):
    """The routed experts of one MoE layer, fused: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj
    [E, H, I]. The eager forward groups tokens by expert and runs each expert that has tokens once."""

    def __init__(self, config: DeepseekConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        tokens, k = top_k_index.shape
        flat_index = top_k_index.reshape(-1)
        order = torch.argsort(flat_index, stable=True)
        counts = torch.bincount(flat_index, minlength=self.num_experts).tolist()
        outputs = []
        for expert, rows in enumerate(hidden_states[order // k].split(counts)):
            if rows.shape[0]:
                gate, up = F.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
                outputs.append(F.linear(self.act_fn(gate) * up, self.down_proj[expert]))
        grouped = torch.cat(outputs)
        unsorted = torch.empty_like(grouped)
        unsorted[order] = grouped
        weighted = unsorted.view(tokens, k, -1) * top_k_weights.unsqueeze(-1)
        return weighted.sum(dim=1).to(hidden_states.dtype)


class DeepseekTopkRouter(nn.Module):
    """Softmax router: fp32 logits over all routed experts, top-k (slot 0 = highest weight), optional
    renormalisation. Returns (router_logits, top-k weights fp32, top-k indices) like transformers' routers."""

    def __init__(self, config: DeepseekConfig, num_experts: int):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = num_experts
        self.norm_topk_prob = config.norm_topk_prob
        if not 0 < self.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} does not fit a layer with {num_experts} routed experts")
        self.weight = nn.Parameter(torch.empty(num_experts, config.hidden_size))

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, k=self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights, indices


class DeepseekMoE(nn.Module):
    """Routed experts plus shared experts; in training, upstream's load-balancing loss lands in `aux_loss`."""

    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.config = config
        num_experts = config.routed_experts_in_layer(layer_idx)
        self.experts = DeepseekExperts(config, num_experts)
        self.gate = DeepseekTopkRouter(config, num_experts)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekMLP(config, config.moe_intermediate_size * config.n_shared_experts)
        self.aux_loss = None

    def forward(self, hidden_states):
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits, weights, indices = self.gate(flat)
        output = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat)
        alpha = self.config.aux_loss_alpha
        self.aux_loss = self._balance_loss(logits.softmax(-1), indices, shape) * alpha if self.training and alpha else None
        return output.view(shape)

    def _balance_loss(self, scores, indices, shape):
        """Upstream's expert-level load-balancing loss (per sequence when `seq_aux`)."""
        n, k = scores.shape[-1], indices.shape[-1]
        if self.config.seq_aux:
            batch, seq_len = shape[0], shape[1]
            load = torch.zeros(batch, n, device=scores.device)
            load.scatter_add_(1, indices.view(batch, -1), torch.ones(batch, seq_len * k, device=scores.device))
            load = load / (seq_len * k / n)
            return (load * scores.view(batch, seq_len, n).mean(dim=1)).sum(dim=1).mean()
        load = F.one_hot(indices.view(-1), num_classes=n).float().mean(0) * n
        return (scores.mean(0) * load).sum()


def repeat_kv(hidden_states, n_rep):
    if n_rep == 1:
        return hidden_states
    batch, heads, length, dim = hidden_states.shape
    return hidden_states[:, :, None].expand(batch, heads, n_rep, length, dim).reshape(batch, heads * n_rep, length, dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DeepseekAttention(nn.Module):
    """Multi-head attention (grouped KV heads allowed) with rotary embeddings, through transformers' attention
    interface (eager, sdpa, flash attention where installed)."""

    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepseekMoE(config, layer_idx)
        else:
            self.mlp = DeepseekMLP(config, config.intermediate_size)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        kwargs.pop("past_key_values", None)
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                          cache, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeepseekDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekExperts):
            module.gate_up_proj.normal_(mean=0.0, std=std)
            module.down_proj.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekTopkRouter):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DeepseekRotaryEmbedding):
            inv_freq, _ = (module.compute_default_rope_parameters if module.rope_type == "default"
                           else ROPE_INIT_FUNCTIONS[module.rope_type])(module.config, module.inv_freq.device)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)


class DeepseekModel(DeepseekPreTrainedModel):
    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: Optional[Cache] = None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None,
                cache: Optional[Cache] = None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **{_MASK_CACHE_ARG: cache if use_cache else None})
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                                  cache=cache if use_cache else None, position_embeddings=position_embeddings)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), hidden_states=all_hidden_states,
                                       **{_CACHE_FIELD: cache if use_cache else None})


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: Optional[Cache] = None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, cache: Optional[Cache] = None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
            aux = [layer.mlp.aux_loss for layer in self.model.layers if getattr(layer.mlp, "aux_loss", None) is not None]
            if aux:
                loss = loss + torch.stack(aux).sum()
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})


__all__ = ["DeepseekConfig", "DeepseekModel", "DeepseekForCausalLM", "DeepseekPreTrainedModel"]
