"""DeepSeekMoE (model_type ``deepseek``) configuration for transformers 5.

Reads upstream ``config.json`` files unchanged and writes them back in the same format.
Self-contained (imports only transformers), so that it can be copied into a checkpoint
directory and loaded with ``trust_remote_code=True``. Part of moe-compress.
"""

from transformers import PretrainedConfig

_ROPE_TYPES = ("linear", "dynamic")


class DeepseekConfig(PretrainedConfig):
    """Configuration of a DeepSeekMoE causal LM (upstream ``deepseek-ai/deepseek-moe-16b-*`` format).

    Extra keys understood by moe-compress:
    - ``n_routed_experts_per_layer``: ``{"<layer index>": count}`` (or a list with one entry per layer,
      ``null`` for dense layers) for checkpoints whose MoE layers keep different numbers of experts.
      Layers that are absent use ``n_routed_experts``.
    """

    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=None,
        n_shared_experts=None,
        n_routed_experts=None,
        num_experts_per_tok=None,
        moe_layer_freq=1,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=100000,
        eos_token_id=100001,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        n_routed_experts_per_layer=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.n_routed_experts_per_layer = _normalise_per_layer_counts(n_routed_experts_per_layer)
        self.rope_theta = rope_theta
        # transformers 5 keeps RoPE settings in `rope_parameters`; `to_dict` writes upstream's keys back.
        self.rope_parameters = _rope_parameters(rope_scaling, rope_theta)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._check()

    def _check(self):
        if self.scoring_func != "softmax":
            raise ValueError(f"DeepSeekMoE supports scoring_func 'softmax' only, got {self.scoring_func!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        for layer in range(self.num_hidden_layers):
            if self.is_moe_layer(layer):
                count = self.routed_experts_in_layer(layer)
                if not 0 < self.num_experts_per_tok <= count:
                    raise ValueError(
                        f"num_experts_per_tok={self.num_experts_per_tok} does not fit layer {layer}, "
                        f"which has {count} routed experts"
                    )
        for layer in self.n_routed_experts_per_layer or {}:
            if not self.is_moe_layer(int(layer)):
                raise ValueError(f"n_routed_experts_per_layer names layer {layer}, which is not an MoE layer")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` is a mixture-of-experts layer (upstream's rule)."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def routed_experts_in_layer(self, layer_idx: int) -> int:
        """Number of routed experts in MoE layer `layer_idx`."""
        per_layer = self.n_routed_experts_per_layer or {}
        return int(per_layer.get(str(layer_idx), self.n_routed_experts))

    def to_dict(self):
        output = super().to_dict()
        rope = output.pop("rope_parameters", None) or {}
        output["rope_theta"] = rope.get("rope_theta", self.rope_theta)
        rope_type = rope.get("rope_type", "default")
        output["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "factor": rope["factor"]}
        if output.get("n_routed_experts_per_layer") is None:
            output.pop("n_routed_experts_per_layer", None)
        return output


def _rope_parameters(rope_scaling, rope_theta):
    if not rope_scaling:
        return {"rope_type": "default", "rope_theta": rope_theta}
    rope_type = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling type must be one of {_ROPE_TYPES}, got {rope_type!r}")
    factor = float(rope_scaling["factor"])
    if factor < 1.0:
        raise ValueError(f"rope_scaling factor must be >= 1, got {factor}")
    return {"rope_type": rope_type, "factor": factor, "rope_theta": rope_theta}


def _normalise_per_layer_counts(counts):
    """Accept ``{"3": 32, ...}`` or ``[null, 32, ...]``; return a dict keyed by layer index strings, or None."""
    if counts is None:
        return None
    if isinstance(counts, (list, tuple)):
        counts = {str(i): c for i, c in enumerate(counts) if c is not None}
    normalised = {str(int(layer)): int(count) for layer, count in dict(counts).items()}
    for layer, count in normalised.items():
        if count < 1:
            raise ValueError(f"n_routed_experts_per_layer: layer {layer} must keep at least one expert")
    return normalised or None
