"""DeepSeekMoE (model_type ``deepseek``) for transformers 5.

Loads upstream checkpoints (``deepseek-ai/deepseek-moe-16b-*``) with their on-disk tensor names
unchanged: per-expert ``mlp.experts.E.{gate,up,down}_proj``, router ``mlp.gate.weight``,
``mlp.shared_experts.*``, dense ``mlp.*`` below ``first_k_dense_replace``.

Routing follows upstream: router logits and softmax in fp32 over all routed experts, top-k, and the
chosen weights renormalised when ``norm_topk_prob`` is true (for every k, as vLLM does, so that a top-1
checkpoint means the same in both runtimes); the routed sum is added to the shared experts' output.
Differences from upstream's remote code: per-layer expert counts (``n_routed_experts_per_layer``),
and experts are dispatched by grouping tokens per expert (a loop over experts, never over tokens).

Self-contained (imports only torch and transformers), so it can be copied into a checkpoint
directory and loaded with ``trust_remote_code=True``. Part of moe-compress.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from .configuration_deepseek import DeepseekConfig
except ImportError:  # loaded as a top-level module
    from configuration_deepseek import DeepseekConfig

# transformers renamed the cache field of model outputs from `past_key_values` to `cache` in 5.2x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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
    """Llama-style rotary embedding with upstream's `linear` and `dynamic` (NTK) scaling."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        rope = config.rope_parameters or {}
        self.dim = config.hidden_size // config.num_attention_heads
        self.base = float(rope.get("rope_theta", config.rope_theta))
        self.rope_type = rope.get("rope_type", "default")
        self.factor = float(rope.get("factor", 1.0))
        self.max_position_embeddings = config.max_position_embeddings

    def _inv_freq(self, base, device):
        # Computed per call (dim/2 values): a buffer would be left uninitialised by meta-device loading.
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base**exponents)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq = self._inv_freq(self.base, x.device)
        positions = position_ids.float()
        if self.rope_type == "linear":
            positions = positions / self.factor
        elif self.rope_type == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_position_embeddings:
                ratio = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
                inv_freq = self._inv_freq(self.base * ratio ** (self.dim / (self.dim - 2)), x.device)
        freqs = positions[..., None] * inv_freq  # [batch, seq, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class DeepseekMLP(nn.Module):
    """SwiGLU MLP: the dense layers, each routed expert, and the shared experts (one MLP)."""

    def __init__(self, config: DeepseekConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoEGate(nn.Module):
    """Softmax router: fp32 logits over all routed experts, top-k, optional renormalisation."""

    def __init__(self, config: DeepseekConfig, n_experts: int):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = n_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        if not 0 < self.top_k <= n_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} does not fit a layer with {n_experts} routed experts")
        self.weight = nn.Parameter(torch.empty(n_experts, config.hidden_size))

    def forward(self, hidden_states):
        """Return (scores [T, E] fp32, top-k indices [T, k], top-k weights [T, k] fp32, aux loss or None).

        `hidden_states` is [batch, seq, hidden]; tokens are flattened in row-major order.
        """
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        logits = F.linear(flat.float(), self.weight.float())
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = None
        if self.training and self.alpha > 0.0:
            aux_loss = self._balance_loss(scores, topk_idx, batch, seq_len)
        return scores, topk_idx, topk_weight, aux_loss

    def _balance_loss(self, scores, topk_idx, batch, seq_len):
        """Upstream's expert-level load-balancing loss (per sequence when `seq_aux`)."""
        n = self.n_routed_experts
        if self.seq_aux:
            seq_scores = scores.view(batch, seq_len, n)
            load = torch.zeros(batch, n, device=scores.device)
            load.scatter_add_(1, topk_idx.view(batch, -1), torch.ones(batch, seq_len * self.top_k, device=scores.device))
            load = load / (seq_len * self.top_k / n)
            return (load * seq_scores.mean(dim=1)).sum(dim=1).mean() * self.alpha
        load = F.one_hot(topk_idx.view(-1), num_classes=n).float().mean(0) * n
        return (scores.mean(0) * load).sum() * self.alpha


class DeepseekMoE(nn.Module):
    """Routed experts (one MLP each) plus shared experts.

    `observer`, when set (e.g. by a profiler), is called once per forward with keyword arguments
    hidden_states, scores, topk_idx, topk_weight, expert_outputs ([T, k, hidden], unweighted),
    routed_output and shared_output.
    """

    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_routed_experts = config.routed_experts_in_layer(layer_idx)
        self.experts = nn.ModuleList(
            DeepseekMLP(config, config.moe_intermediate_size) for _ in range(self.n_routed_experts)
        )
        self.gate = DeepseekMoEGate(config, self.n_routed_experts)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekMLP(config, config.moe_intermediate_size * config.n_shared_experts)
        self.aux_loss = None
        self.observer = None

    def expert_outputs(self, flat_hidden, topk_idx):
        """Unweighted outputs of every chosen expert: [tokens, k, hidden].

        Tokens are grouped by expert (a stable sort), and each expert with tokens runs once.
        """
        tokens, k = topk_idx.shape
        flat_idx = topk_idx.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=self.n_routed_experts).tolist()
        grouped_inputs = flat_hidden[order // k].split(counts)
        grouped_outputs = torch.cat(
            [self.experts[expert](inputs) for expert, inputs in enumerate(grouped_inputs) if inputs.shape[0]]
        )
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        outputs = grouped_outputs[inverse]
        return outputs.view(tokens, k, -1)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        scores, topk_idx, topk_weight, self.aux_loss = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, shape[-1])
        outputs = self.expert_outputs(flat, topk_idx)
        routed = (outputs.float() * topk_weight.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)
        shared = self.shared_experts(flat) if self.shared_experts is not None else None
        if self.observer is not None:
            self.observer(
                hidden_states=flat,
                scores=scores,
                topk_idx=topk_idx,
                topk_weight=topk_weight,
                expert_outputs=outputs,
                routed_output=routed,
                shared_output=shared,
            )
        result = routed if shared is None else routed + shared
        return result.view(shape)


def _eager_attention(query, key, value, mask, dropout, training):
    scale = 1.0 / math.sqrt(query.shape[-1])
    weights = torch.matmul(query, key.transpose(2, 3)) * scale
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if mask is None and q_len > 1:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if mask is not None:
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    weights = weights.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value)


class DeepseekAttention(nn.Module):
    """Plain multi-head attention (grouped KV heads allowed) with rotary embeddings."""

    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.kv_groups = self.num_heads // self.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, position_embeddings, mask, cache=None):
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if self.kv_groups > 1:
            key = key.repeat_interleave(self.kv_groups, dim=1)
            value = value.repeat_interleave(self.kv_groups, dim=1)
        dropout = self.config.attention_dropout if self.training else 0.0
        implementation = self.config._attn_implementation or "sdpa"
        if implementation == "eager":
            output = _eager_attention(query, key, value, mask, dropout, self.training)
        elif implementation == "sdpa":
            is_causal = mask is None and q_len > 1
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
            )
        else:
            raise ValueError(f"DeepSeekMoE supports attn_implementation 'eager' or 'sdpa', not {implementation!r}")
        output = output.transpose(1, 2).reshape(batch, q_len, -1)
        return self.o_proj(output)


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

    def forward(self, hidden_states, position_embeddings, mask, cache=None):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeepseekDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekMoEGate):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekRMSNorm):
            module.weight.fill_(1.0)


def _attention_mask(attention_mask, batch, q_len, past_len, device):
    """Boolean mask [batch, 1, q_len, past_len + q_len] (True = attend), or None for plain causal prefill."""
    kv_len = past_len + q_len
    if attention_mask is None and (q_len == 1 or past_len == 0):
        return None
    query_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    causal = torch.arange(kv_len, device=device)[None, :] <= query_pos
    mask = causal[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -kv_len:].bool()
    return mask


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

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        cache: Optional[Cache] = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, q_len, _ = inputs_embeds.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)[None]
        mask = _attention_mask(attention_mask, batch, q_len, past_len, inputs_embeds.device)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, cache if use_cache else None)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


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

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        cache: Optional[Cache] = None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
            aux_losses = [
                layer.mlp.aux_loss for layer in self.model.layers if getattr(layer.mlp, "aux_loss", None) is not None
            ]
            if aux_losses:
                loss = loss + torch.stack(aux_losses).sum()
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


__all__ = ["DeepseekConfig", "DeepseekModel", "DeepseekForCausalLM", "DeepseekPreTrainedModel"]
