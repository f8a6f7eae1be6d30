"""DeepSeek-V2 / V2-Lite (model_type ``deepseek_v2``), run by transformers' native ``DeepseekV2ForCausalLM``.

On disk, experts are per-expert tensors like DeepSeekMoE's. In memory (transformers 5) each MoE layer
stores its experts fused: ``mlp.experts.gate_up_proj`` [E, 2*I, H] (expert e's gate rows, then its up
rows) and ``mlp.experts.down_proj`` [E, H, I]; the router is ``mlp.gate.weight`` [E, H] (kept in fp32).
transformers' router: softmax, then greedy top-k or group-limited greedy (``n_group`` contiguous groups
scored by their best expert, top ``topk_group`` groups), weights times ``routed_scaling_factor``; it does
not apply ``norm_topk_prob``. Every layer from ``first_k_dense_replace`` on is MoE, all with the same
number of experts (``n_routed_experts``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch

from compressor.errors import UserError
from compressor.families.base import FamilyAdapter, RouterSpec

_SUPPORTED_TOPK = ("greedy", "group_limited_greedy")
_EXPERT_KEY_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
GATE_UP = "mlp.experts.gate_up_proj"
DOWN = "mlp.experts.down_proj"
UNGROUP_HINT = (
    "or route without groups (topk_method: greedy, n_group: 1, topk_group: 1), which pruned_config(..., ungroup=True) "
    "writes (tokens may then pick experts outside their best groups)"
)


class DeepseekV2Family(FamilyAdapter):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)

    def is_moe_layer(self, config: Mapping, layer: int) -> bool:
        freq = config.get("moe_layer_freq", 1)
        if freq not in (None, 1):
            raise UserError(
                f"moe_layer_freq={freq} is not supported: transformers' DeepSeek-V2 makes every layer from "
                "first_k_dense_replace on an MoE layer"
            )
        return 0 <= layer < self.num_layers(config) and layer >= int(config.get("first_k_dense_replace") or 0)

    def num_experts(self, config: Mapping, layer: int) -> int:
        if not self.is_moe_layer(config, layer):
            raise UserError(f"layer {layer} is not an MoE layer of this {self.name} model")
        if config.get("n_routed_experts_per_layer"):
            raise UserError("DeepSeek-V2 in transformers needs the same expert count in every layer "
                            "(config.json has n_routed_experts_per_layer)")
        return int(self._require(config, self.expert_count_key))

    def num_shared_experts(self, config: Mapping) -> int:
        return int(config.get("n_shared_experts", 2) or 0)  # transformers' default is 2

    def router(self, config: Mapping) -> RouterSpec:
        method = config.get("topk_method") or "greedy"
        if method not in _SUPPORTED_TOPK:
            raise UserError(
                f"DeepSeek-V2 in transformers supports topk_method {' or '.join(_SUPPORTED_TOPK)}, not {method!r}"
            )
        scoring = config.get("scoring_func") or "softmax"
        if scoring != "softmax":
            raise UserError(f"DeepSeek-V2 in transformers scores experts with softmax, not {scoring!r}")
        return RouterSpec(
            scoring=scoring,
            top_k=self.top_k(config),
            renormalize=bool(config.get("norm_topk_prob", False)),
            topk_method=method,
            n_group=int(config.get("n_group") or 1),
            topk_group=int(config.get("topk_group") or 1),
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
            has_bias=False,
        )

    # -- pruning ----------------------------------------------------------------------------------

    def pruned_config(self, config, kept, top_k, *, ungroup: bool = False) -> dict:
        plan = self.check_kept(config, kept, top_k)
        counts = sorted({len(experts) for experts in plan.values()})
        if len(counts) > 1:
            raise UserError(
                "DeepSeek-V2 in transformers needs the same expert count in every layer; "
                f"the plan keeps between {counts[0]} and {counts[-1]} experts per layer"
            )
        router = self.router(config)
        new = copy.deepcopy(dict(config))
        if router.grouped:
            if ungroup:
                new.update(topk_method="greedy", n_group=1, topk_group=1)
            else:
                self._check_groups(config, plan, int(top_k), router)
        if counts:
            new[self.expert_count_key] = counts[0]
        new[self.top_k_key] = int(top_k)
        return new

    def _check_groups(self, config, plan: dict[int, list[int]], top_k: int, router: RouterSpec) -> None:
        n_group = router.n_group
        where = (
            f"the router picks experts from the best {router.topk_group} of {n_group} expert groups "
            f"({router.topk_method})"
        )
        for layer, experts in sorted(plan.items()):
            total = self.num_experts(config, layer)
            if total % n_group:
                raise UserError(f"layer {layer}: {total} experts cannot form {n_group} equal groups ({where})")
            size = total // n_group
            count = len(experts)
            if count % n_group:
                raise UserError(
                    f"{where}, so the kept expert count must stay divisible by n_group={n_group} with every group "
                    f"keeping the same number; the plan keeps {count}. Keep a multiple of {n_group}, {UNGROUP_HINT}"
                )
            per = count // n_group
            per_group = [0] * n_group
            for expert in experts:
                per_group[expert // size] += 1
            if any(c != per for c in per_group):
                raise UserError(
                    f"{where}, so every group must keep the same number of experts ({per}); layer {layer} keeps "
                    f"{per_group} from groups 0..{n_group - 1}. Balance the plan, {UNGROUP_HINT}"
                )
            for block in range(n_group):
                groups = {expert // size for expert in experts[block * per : (block + 1) * per]}
                if len(groups) != 1:
                    raise UserError(
                        f"{where}; layer {layer} must list its kept experts group by group (new group {block} = "
                        f"kept positions {block * per}..{(block + 1) * per - 1}), e.g. in ascending order"
                    )
            if top_k > router.topk_group * per:
                raise UserError(
                    f"{where}; top_k={top_k} exceeds the {router.topk_group * per} experts left in "
                    f"{router.topk_group} groups of {per}. Keep more experts per group, {UNGROUP_HINT}"
                )

    def compensation_config(self, config, compensation: str) -> dict:
        if compensation == "renorm":
            raise UserError(
                "compensation 'renorm' cannot be expressed for DeepSeek-V2: transformers' DeepSeek-V2 never "
                "renormalises the top-k weights; use none"
            )
        if compensation != "none":
            raise UserError(f"compensation {compensation!r} (fitted) is not implemented for DeepSeek-V2 yet; use none")
        return {}

    def native_transformers_support(self, config, kept, top_k, *, ungroup: bool = False) -> str | None:
        try:
            self.pruned_config(config, kept, top_k, ungroup=ungroup)
        except UserError as exc:
            return str(exc)
        if config.get("norm_topk_prob") and int(top_k) > 1:
            return "transformers' DeepSeek-V2 ignores norm_topk_prob (it never renormalises the top-k weights)"
        return None

    # -- in memory --------------------------------------------------------------------------------

    def model_class(self, config: Mapping) -> type:
        from transformers import DeepseekV2ForCausalLM

        return DeepseekV2ForCausalLM

    def config_class(self, config: Mapping) -> type:
        from transformers import DeepseekV2Config

        return DeepseekV2Config

    def attach_routing_observer(self, decoder_layer, callback):
        """Swap the MoE block's forward for an equivalent one that also reports per-slot expert outputs."""
        block = decoder_layer.mlp
        if "forward" in vars(block):
            raise RuntimeError("this MoE block already has an observer attached")

        def forward(hidden_states):
            shape = hidden_states.shape
            flat = hidden_states.reshape(-1, shape[-1])
            scores, topk_weight, topk_idx = block.gate(hidden_states)
            topk_weight, order = topk_weight.sort(dim=-1, descending=True)  # slot 0 = highest weight
            topk_idx = topk_idx.gather(-1, order)
            outputs = _v2_expert_outputs(block.experts, flat, topk_idx)
            routed = (outputs.float() * topk_weight.unsqueeze(-1)).sum(1).to(flat.dtype)
            shared = block.shared_experts(flat)
            callback(hidden_states=flat, scores=scores, topk_idx=topk_idx, topk_weight=topk_weight,
                     expert_outputs=outputs, routed_output=routed, shared_output=shared)
            return (routed + shared).view(shape)

        block.forward = forward

        def detach():
            del block.forward

        return detach

    def run_decoder_layer(self, model, decoder_layer, hidden_states, attention_mask):
        import inspect

        from transformers.masking_utils import create_causal_mask

        inner = model.model
        if any(buffer.is_meta for buffer in inner.rotary_emb.buffers()):
            with torch.device(hidden_states.device):
                inner.rotary_emb = type(inner.rotary_emb)(model.config)
        batch, seq_len, _ = hidden_states.shape
        positions = torch.arange(seq_len, device=hidden_states.device)[None].expand(batch, seq_len)
        cache_key = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  position_ids=positions, **{cache_key: None})
        position_embeddings = inner.rotary_emb(hidden_states, positions)
        return decoder_layer(hidden_states, attention_mask=mask, position_ids=positions,
                             position_embeddings=position_embeddings)

    def layer_state_dict(self, config, layer, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        local = self._strip_layer_prefix(layer, tensors)
        if not self.is_moe_layer(config, layer):
            return local
        parts: dict[str, dict[int, torch.Tensor]] = {"gate_proj": {}, "up_proj": {}, "down_proj": {}}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in local.items():
            match = _EXPERT_KEY_RE.match(key)
            if match:
                parts[match.group(2)][int(match.group(1))] = tensor
            elif key.startswith("mlp.experts."):
                raise UserError(f"unexpected expert tensor {self.layer_prefix(layer)}{key} for {self.name}")
            else:
                out[key] = tensor
        if not any(parts.values()):
            return out  # no expert tensors given (partial load)
        count = self.num_experts(config, layer)
        for proj, found in parts.items():
            if set(found) != set(range(count)):
                missing = sorted(set(range(count)) - set(found)) or sorted(set(found) - set(range(count)))
                raise UserError(
                    f"layer {layer} has {count} experts; {proj} tensors do not match (expert {missing[0]})"
                )
        gate, up, down = parts["gate_proj"][0], parts["up_proj"][0], parts["down_proj"][0]
        inter, hidden = gate.shape
        gate_up = torch.empty((count, 2 * inter, hidden), dtype=gate.dtype, device=gate.device)
        down_all = torch.empty((count, *down.shape), dtype=down.dtype, device=down.device)
        for expert in range(count):
            gate_up[expert, :inter] = parts["gate_proj"][expert]
            gate_up[expert, inter:] = parts["up_proj"][expert]
            down_all[expert] = parts["down_proj"][expert]
        out[GATE_UP] = gate_up
        out[DOWN] = down_all
        return out

    def layer_disk_tensors(self, config, layer, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = self.layer_prefix(layer)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key == GATE_UP:
                inter = tensor.shape[1] // 2
                for expert in range(tensor.shape[0]):
                    out[self.expert_tensor_name(layer, expert, "gate_proj.weight")] = tensor[expert, :inter]
                    out[self.expert_tensor_name(layer, expert, "up_proj.weight")] = tensor[expert, inter:]
            elif key == DOWN:
                for expert in range(tensor.shape[0]):
                    out[self.expert_tensor_name(layer, expert, "down_proj.weight")] = tensor[expert]
            else:
                out[prefix + key] = tensor
        return out


def _v2_expert_outputs(experts, flat, topk_idx):
    """Unweighted outputs of each chosen expert of transformers' fused DeepseekV2Experts: [tokens, k, hidden]."""
    tokens, k = topk_idx.shape
    outputs = flat.new_empty(tokens, k, flat.shape[-1])
    for expert in torch.unique(topk_idx).tolist():
        rows, slots = torch.nonzero(topk_idx == expert, as_tuple=True)
        gate, up = torch.nn.functional.linear(flat[rows], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        outputs[rows, slots] = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
    return outputs
