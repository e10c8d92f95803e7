"""Mixture-of-experts block of executor.model (Qwen3-MoE, Mixtral): a top-k router over
`experts` SwiGLU experts, the chosen experts' outputs weighted and summed.

Module names mirror the Hugging Face checkpoints: Qwen3-MoE's `mlp.gate` and
`mlp.experts.E.{gate,up,down}_proj`, Mixtral's `block_sparse_moe.gate` and
`block_sparse_moe.experts.E.{w1,w3,w2}`. The plan names a layer's experts as one bank
(`layers.N.mlp.experts`); `module_path` maps plan names onto these modules.

The arithmetic follows transformers' Qwen3MoeSparseMoeBlock: softmax in float32 over the
router logits, top-k, renormalised when the model says so, cast back; experts visited in
index order, each output weighted and added with index_add_.

Offload code chooses where each expert runs by replacing `SparseMoE.dispatch` (a callable
taking flat hidden states, top-k indices and weights), keeping the router in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planner.model.spec import ModelSpec

# Hugging Face attribute names per family: the sparse block, and an expert's gate, up, down.
_BLOCK = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def block_name(spec: ModelSpec) -> str:
    return _BLOCK.get(spec.family, "mlp")


def module_path(spec: ModelSpec, name: str) -> str:
    """Module path under `model.` of plan tensor `name` (`layers.3.mlp.experts` is
    `layers.3.block_sparse_moe.experts` in Mixtral)."""
    block = block_name(spec)
    if block != "mlp" and ".mlp." in name:
        return name.replace(".mlp.", f".{block}.", 1)
    return name


class Expert(nn.Module):
    """One SwiGLU expert: down(silu(gate(x)) * up(x)), under the family's attribute names."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        assert spec.moe is not None
        self._names = _EXPERT_NAMES.get(spec.family, _EXPERT_NAMES["qwen3_moe"])
        gate, up, down = self._names
        inter = spec.moe.expert_intermediate
        setattr(self, gate, nn.Linear(spec.hidden, inter, bias=False, dtype=dtype))
        setattr(self, up, nn.Linear(spec.hidden, inter, bias=False, dtype=dtype))
        setattr(self, down, nn.Linear(inter, spec.hidden, bias=False, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, hidden] -> [n, hidden]
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(F.silu(gate(x)) * up(x))


def dispatch_all(experts: nn.ModuleList, flat: torch.Tensor, top_index: torch.Tensor,
                 top_weight: torch.Tensor) -> torch.Tensor:
    """Every routed expert where it is: flat [n, hidden], top_index / top_weight [n, k]."""
    out = torch.zeros_like(flat)
    run_experts(experts, range(len(experts)), flat, top_index, top_weight, out)
    return out


def run_experts(experts: nn.ModuleList, which, flat: torch.Tensor, top_index: torch.Tensor,
                top_weight: torch.Tensor, out: torch.Tensor) -> None:
    """Add the weighted outputs of experts `which` (in the order given) into out [n, hidden],
    on out's device; each expert sees only the tokens routed to it."""
    for e in which:
        top_pos, token = torch.where(top_index.T == e)  # [m] each: rank among the k, token row
        if token.numel() == 0:
            continue
        y = experts[e](flat[token].to(_device(experts[e], flat)))  # [m, hidden]
        y = y.to(out.device) * top_weight[token, top_pos, None].to(out.device)
        out.index_add_(0, token.to(out.device), y.to(out.dtype))


def _device(module: nn.Module, default: torch.Tensor) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else default.device


class SparseMoE(nn.Module):
    """Router (`gate`) and experts; forward x [batch, t, hidden] -> [batch, t, hidden]."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        assert spec.moe is not None
        self.top_k, self.norm_topk = spec.moe.active, spec.moe.norm_topk
        self.gate = nn.Linear(spec.hidden, spec.moe.experts, bias=False, dtype=dtype)
        self.experts = nn.ModuleList(Expert(spec, dtype) for _ in range(spec.moe.experts))
        self.dispatch = lambda flat, index, weight: dispatch_all(self.experts, flat, index, weight)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k expert indices [n, k], their weights [n, k] in flat's dtype)."""
        logits = self.gate(flat)  # [n, experts]
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weight, index = torch.topk(probs, self.top_k, dim=-1)  # [n, k] each
        if self.norm_topk:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return index, weight.to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, t, hidden = x.shape
        flat = x.reshape(-1, hidden)  # [n, hidden]
        index, weight = self.route(flat)
        return self.dispatch(flat, index, weight).reshape(batch, t, hidden)
