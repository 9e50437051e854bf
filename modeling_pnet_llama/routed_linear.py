"""The top-1 routed linear map of ParameterNet (Han et al., arXiv 2306.14525): `y_t = s_t * (W[e_t] x_t + b[e_t])`.

One implementation for every model that routes a projection: PNet-LLaMA's gate/up/down (here), PNet-Swin's fc2
(`modeling_parameternet/routed_linear.py` is a link to this file, so each model package travels alone with its
checkpoints) and the vLLM model (`pnet/vllm_pnet_llama.py`).

- `TopOneRouter`: Switch's router, `logits = x R^T` in float32, softmax, argmax; `s` is the top-1 probability (or
  p / stop_grad(p), exactly 1.0 in value, for upcycled models).
- `ExpertLinear`: the experts, one `(num_experts, out_features, in_features)` weight. Tokens are sorted by expert on
  the device (argsort + searchsorted: no host sync, shapes depend only on the token count) and multiplied in one
  grouped matmul (`F.grouped_mm`, or transformers' per-expert fallback operator where grouped_mm does not take the
  operands); optional Switch capacity.
- `load_balancing_loss`, `router_z_loss`: the router losses, over the non-padding tokens, averaged over routers.
- `RoutedWeightsLoading`: `from_pretrained` that refuses to random-initialise routers or experts.
"""

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations import moe as transformers_moe  # registers torch.ops.transformers.grouped_mm_fallback

from .transformers_version import TRANSFORMERS_REQUIREMENT


# Two transformers internals (underscored or unexported: a later release may rename them) that every routed forward
# uses: without them, fail at import naming them, not with an AttributeError inside the first forward.
_MISSING_INTERNALS = [
    name
    for name, present in (
        ("transformers.integrations.moe._can_use_grouped_mm", hasattr(transformers_moe, "_can_use_grouped_mm")),
        ("torch.ops.transformers.grouped_mm_fallback", hasattr(torch.ops.transformers, "grouped_mm_fallback")),
    )
    if not present
]
if _MISSING_INTERNALS:
    import transformers

    raise ImportError(
        f"pnet's routed linear uses {_MISSING_INTERNALS}, which transformers {transformers.__version__} does not "
        f"provide. pnet's model code is tested on the oldest and newest releases of {TRANSFORMERS_REQUIREMENT!r}: "
        "install another release in that range, or a pnet that supports this one."
    )


class RouterOutput(NamedTuple):
    """What a `TopOneRouter` returns for `T` tokens."""

    router_logits: torch.Tensor  # (T, num_experts), float32
    expert_index: torch.Tensor  # (T,), int64: the argmax expert of each token
    expert_scale: torch.Tensor  # (T,): multiplies the chosen expert's output (top-1 probability, or p / stop_grad(p))


class TopOneRouter(nn.Module):
    """Switch-Transformer top-1 router: `logits = x W^T` (no bias), softmax in float32, argmax.

    The router runs in float32 whatever the model dtype (Switch's "selective precision"): with bf16 logits the
    softmax and the argmax are noticeably noisier. Jitter (Switch) multiplies the router input by U(1 - eps, 1 + eps)
    in training only; the experts still see the clean input. `straight_through` scales the expert output by
    p / stop_grad(p): exactly 1.0 in value, the gradient of p (divided by p) for the router.
    """

    def __init__(
        self, in_features: int, num_experts: int, jitter_noise: float = 0.0, expert_output_scaling: str = "router_prob"
    ):
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.jitter_noise = jitter_noise
        self.expert_output_scaling = expert_output_scaling
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        hidden_states = hidden_states.reshape(-1, self.in_features).float()
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        if torch.is_autocast_enabled(hidden_states.device.type):  # autocast would run the matmul in bf16/fp16
            with torch.autocast(hidden_states.device.type, enabled=False):
                router_logits = F.linear(hidden_states, self.weight.float())
        else:  # (no context manager per call: in decoding every op of the router is a measurable share of a token)
            router_logits = F.linear(hidden_states, self.weight.float())
        top_prob, expert_index = torch.softmax(router_logits, dim=-1).max(dim=-1)
        expert_scale = top_prob / top_prob.detach() if self.expert_output_scaling == "straight_through" else top_prob
        return RouterOutput(router_logits, expert_index, expert_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, jitter_noise={self.jitter_noise}"


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Switch capacity: the most tokens one expert processes in a forward, ceil(tokens / experts * factor)."""
    return math.ceil(num_tokens / num_experts * capacity_factor)


def sort_by_expert(expert_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, start_offsets, end_offsets): `order` sorts the tokens by expert, stably (within an expert tokens keep
    their order, which is also the capacity priority); expert e's sorted rows are `[start[e], end[e])`, int64. On the
    device, without a host sync (`bincount` reads its maximum on the host)."""
    order = torch.argsort(expert_index, stable=True)
    experts = torch.arange(num_experts, device=expert_index.device, dtype=expert_index.dtype)
    sorted_experts = expert_index.index_select(0, order)
    start = torch.searchsorted(sorted_experts, experts)
    end = torch.searchsorted(sorted_experts, experts, right=True)
    return order, start, end


def grouped_mm_takes(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands: transformers' rule for its own experts (device, dtype under
    torch.compile), plus what its kernels accept: one dtype for both operands, bfloat16 on CUDA and fp32/bf16/fp16 on
    the CPU, rows of a multiple of 16 bytes (the CPU backward kernels reject other strides)."""
    row_bytes = hidden_states.element_size()
    on_cuda = weight.device.type == "cuda"
    kernel_dtypes = (torch.bfloat16,) if on_cuda else (torch.float32, torch.bfloat16, torch.float16)
    return (
        hidden_states.dtype == weight.dtype
        and weight.dtype in kernel_dtypes
        and (weight.shape[-1] * row_bytes) % 16 == 0
        and (weight.shape[-2] * row_bytes) % 16 == 0
        and transformers_moe._can_use_grouped_mm(hidden_states, weight, None)
    )


def grouped_linear(sorted_states: torch.Tensor, weight: torch.Tensor, end_offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `sorted_states` grouped by expert (group e ends at `end_offsets[e]`, int32) times their expert's
    `weight[e].T`: `F.grouped_mm` where it takes the operands, else transformers' per-expert operator (eager)."""
    if grouped_mm_takes(sorted_states, weight):
        return F.grouped_mm(sorted_states, weight.transpose(-2, -1), offs=end_offsets)
    return torch.ops.transformers.grouped_mm_fallback(sorted_states, weight.transpose(-2, -1), end_offsets)


def routed_matmul(hidden_states: torch.Tensor, weight: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """`y[t] = weight[expert_index[t]] @ hidden_states[t]`: hidden_states (T, in), weight (E, out, in) -> (T, out).
    Every shape depends only on T; no host sync on the grouped_mm path and in compiled graphs."""
    if torch.compiler.is_compiling() and not grouped_mm_takes(hidden_states, weight):
        # Traced without the per-expert operator, which reads the group sizes on the host (no CUDA graphs) and whose
        # backward transformers 5.19 cannot trace: every expert on every token, then a gather (num_experts x the
        # FLOPs).
        num_experts, out_features, in_features = weight.shape
        every_expert = F.linear(hidden_states, weight.reshape(-1, in_features)).view(-1, num_experts, out_features)
        return every_expert.gather(1, expert_index.view(-1, 1, 1).expand(-1, 1, out_features)).squeeze(1)
    order, _, end = sort_by_expert(expert_index, weight.shape[0])
    inverse_order = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    sorted_output = grouped_linear(hidden_states.index_select(0, order), weight, end.to(torch.int32))
    return sorted_output.index_select(0, inverse_order)


class ExpertLinear(nn.Module):
    """`num_experts` linear maps (bias optional) in one `(num_experts, out_features, in_features)` weight; each token
    goes through the one expert its router chose, its output scaled by the router's `expert_scale`.

    `capacity_factor=None` is dropless; a number gives every expert ceil(tokens / experts * factor) slots, and the
    tokens beyond (in token order) get a zero output (Switch).
    """

    matmul = staticmethod(routed_matmul)  # the vLLM model swaps in the same function as an opaque custom op

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        capacity_factor: float | None = None,
        bias: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None

    def forward(
        self, hidden_states: torch.Tensor, expert_index: torch.Tensor, expert_scale: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states (T, in_features), expert_index (T,), expert_scale (T,) -> (T, out_features)."""
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(hidden_states.device.type):
            # grouped_mm is not on autocast's op list (F.linear is): cast as autocast would, or the bf16 activation
            # meets the fp32 master weight.
            dtype = torch.get_autocast_dtype(hidden_states.device.type)
            hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        expert_scale = expert_scale.to(hidden_states.dtype)[:, None]
        if self.capacity_factor is not None:
            expert_scale = expert_scale * self._kept(expert_index)[:, None].to(expert_scale.dtype)

        # (y = W (s x) = s (W x) without a bias: scale whichever side of the matmul is narrower.)
        scale_input = bias is None and self.in_features <= self.out_features
        if scale_input:
            hidden_states = hidden_states * expert_scale
        if self.num_experts == 1:  # exactly nn.Linear (a PNet model with one expert is its dense model)
            output = F.linear(hidden_states, weight[0])
        elif hidden_states.shape[0] == 1 and hidden_states.device.type == "cpu" and not torch.compiler.is_compiling():
            # Decode on the CPU: one dense matmul with the chosen expert (reading the index syncs with nothing here);
            # pays in greedy generation (bench/bench_moe.py [3]).
            output = F.linear(hidden_states, weight[expert_index.item()])
        else:
            output = self.matmul(hidden_states, weight, expert_index)
        if bias is not None:
            output = output + bias.index_select(0, expert_index)
        return output if scale_input else output * expert_scale

    def _kept(self, expert_index: torch.Tensor) -> torch.Tensor:
        """(T,) bool: whether each token fits in its expert's capacity (the first tokens of each expert do)."""
        num_tokens = expert_index.shape[0]
        capacity = expert_capacity(num_tokens, self.num_experts, self.capacity_factor)
        order, start, _ = sort_by_expert(expert_index, self.num_experts)
        position_in_expert = torch.arange(num_tokens, device=expert_index.device) - start[expert_index[order]]
        return torch.empty_like(order, dtype=torch.bool).scatter_(0, order, position_in_expert < capacity)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, capacity_factor={self.capacity_factor}"
        )


class RoutedWeightsLoading:
    """Mixin (before the transformers base class) for a model with routed modules: `from_pretrained` refuses a
    checkpoint that lacks a weight of a `routed_module_types` module, or holds it in another shape (saved with another
    `num_experts`). transformers would random-initialise it, reported in a log line only, and the model would compute
    nonsense. Other missing weights get transformers' usual report."""

    routed_module_types: tuple[type[nn.Module], ...] = (ExpertLinear, TopOneRouter)
    routing_config_keys: tuple[str, ...] = ("num_experts",)  # named in the error
    dense_checkpoint_hint: str = ""  # how to start from a dense checkpoint instead, when this model has a way

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        routed = {
            f"{module_name}.{param_name}"
            for module_name, module in model.named_modules()
            if isinstance(module, cls.routed_module_types)
            for param_name, _ in module.named_parameters()
        }
        missing = sorted(key for key in loading_info["missing_keys"] if key in routed)
        mismatched = sorted(
            f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(shape)}"
            for key, ckpt, shape in loading_info["mismatched_keys"]
            if key in routed
        )
        if missing or mismatched:
            settings = ", ".join(f"{key}={getattr(model.config, key)!r}" for key in cls.routing_config_keys)
            hint = f" {cls.dense_checkpoint_hint}" if cls.dense_checkpoint_hint else ""
            raise ValueError(
                f"checkpoint does not match this {type(model).__name__} ({settings}); refusing to random-initialise "
                f"routers or experts. Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                f"mismatched: {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}.{hint}"
            )
        return (model, loading_info) if return_loading_info else model


def relay_router_logits(submodule: nn.Module) -> None:
    """For a model whose inherited forward calls `submodule`, which returns `router_logits`, and then rebuilds its own
    output without them (transformers' LLaMA heads, Swin's model and classifier): a forward hook, installed once, keeps
    them on `submodule` until `take_router_logits(submodule)`, so the inherited forward runs as it is (and compiles
    with `fullgraph=True`). They are kept on the submodule that ran, not on its caller: each `nn.DataParallel` replica
    reads its own."""
    submodule._relayed_router_logits = None
    submodule.register_forward_hook(_keep_router_logits)


def _keep_router_logits(module: nn.Module, args: tuple, output) -> None:
    module._relayed_router_logits = getattr(output, "router_logits", None)


def take_router_logits(submodule: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The router logits of `submodule`'s last forward (see `relay_router_logits`); none are kept afterwards (they
    would pin that forward's graph). When `submodule` has since been wrapped by a module that does not forward
    attribute writes (DDP, FSDP), they are on the module the wrapper holds: its one child."""
    holder = submodule
    while holder is not None and "_relayed_router_logits" not in vars(holder):
        holder = next(holder.children(), None)
    if holder is None:
        raise RuntimeError(f"{type(submodule).__name__} relays no router logits: was it replaced after construction?")
    router_logits, holder._relayed_router_logits = holder._relayed_router_logits, None
    return router_logits


@contextlib.contextmanager
def replacing_dense_modules(module: nn.Module):
    """Run a transformers constructor whose dense modules the block then replaces with routed ones, on the meta
    device: the replaced modules cost no memory and no initialisation (gigabytes and seconds at 1B scale), and no
    transformers code is copied to avoid building them. Afterwards the module gets storage on the device it would have
    been built on; the model's `post_init` initialises every weight (and recomputes buffers such as rotary
    frequencies and Swin's relative position index), as for any new model."""
    device = torch.get_default_device()
    with torch.device("meta"):
        yield
    module.to_empty(device=device)


def _token_weights(router_logits: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """(T, 1) float weights of the tokens, each 1 / (number of non-padding tokens), 0 for padding."""
    if token_mask is None:
        return router_logits.new_full((router_logits.shape[0], 1), 1.0 / router_logits.shape[0])
    weight = token_mask.reshape(-1, 1).to(router_logits.device, torch.float32)
    return weight / weight.sum().clamp_min(1.0)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss, averaged over routers: for each router `N * sum_i f_i * P_i`, with `f_i` the
    fraction of (non-padding) tokens whose argmax is expert i and `P_i` their mean router probability for i.
    Equals 1.0 at perfectly uniform routing; only `P` carries gradient.

    router_logits: one (T, N) tensor per router; token_mask: T entries (e.g. (batch, seq_len)), 1 = token, 0 = padding.
    """
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        weights = _token_weights(probs, token_mask)
        fraction = (F.one_hot(probs.argmax(dim=-1), num_experts) * weights).sum(dim=0)
        losses.append(num_experts * torch.sum(fraction * (probs * weights).sum(dim=0)))
    return torch.stack(losses).mean()


def router_z_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ST-MoE router z-loss averaged over routers: mean over (non-padding) tokens of logsumexp(logits)^2."""
    losses = [
        (torch.logsumexp(logits.float(), dim=-1, keepdim=True) ** 2 * _token_weights(logits, token_mask)).sum()
        for logits in router_logits
    ]
    return torch.stack(losses).mean()


__all__ = [
    "ExpertLinear",
    "RoutedWeightsLoading",
    "RouterOutput",
    "TopOneRouter",
    "expert_capacity",
    "grouped_linear",
    "grouped_mm_takes",
    "load_balancing_loss",
    "relay_router_logits",
    "replacing_dense_modules",
    "routed_matmul",
    "router_z_loss",
    "sort_by_expert",
    "take_router_logits",
]
