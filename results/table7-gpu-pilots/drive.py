"""Pilot driver (results/table7-gpu-pilots): runs scripts/pretrain.py main() unmodified, with an optional router patch (env ROUTER_MODE):
  learned (default) | center: logits minus their token mean per expert (batch mean in training, EMA in eval)
  | hash: expert = fixed random table[token id] (Hash layers; router unused) | frozen: router weights not trained."""
import importlib.util, os, sys
import torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
import modeling_pnet_llama.modeling_pnet_llama as mp

mode = os.environ.get("ROUTER_MODE", "learned")
CURRENT = {}
if mode == "hash":
    orig_lm_forward = mp.PNetLlamaForCausalLM.forward
    def lm_forward(self, input_ids=None, *args, **kwargs):
        CURRENT["ids"] = input_ids
        return orig_lm_forward(self, input_ids, *args, **kwargs)
    mp.PNetLlamaForCausalLM.forward = lm_forward

orig_router_forward = mp.TopOneRouter.forward
def router_forward(self, hidden_states):
    if mode == "learned" or mode == "frozen":
        return orig_router_forward(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, self.in_features).float()
    logits = F.linear(hidden_states, self.weight.float())
    if mode == "center":
        if not hasattr(self, "logit_center"):
            self.register_buffer("logit_center", torch.zeros(self.num_experts, device=logits.device), persistent=False)
        if self.training:
            center = logits.mean(0).detach()
            self.logit_center.mul_(0.9).add_(0.1 * center)
        else:
            center = self.logit_center
        logits = logits - center
        probs = torch.softmax(logits, -1); top, index = probs.max(-1)
    else:  # hash
        if not hasattr(self, "table"):
            g = torch.Generator().manual_seed(1234 + self.in_features)
            self.table = torch.randint(0, self.num_experts, (32000,), generator=g).to(logits.device)
        index = self.table[CURRENT["ids"].reshape(-1)]
        probs = torch.softmax(logits, -1); top = probs.gather(1, index[:, None])[:, 0]
    scale = top / top.detach() if self.expert_output_scaling == "straight_through" else top
    return mp.RouterOutput(logits, index, scale)
mp.TopOneRouter.forward = router_forward

if mode == "frozen":
    orig_init = mp.PNetLlamaPreTrainedModel._init_weights
    def init(self, module):
        orig_init(self, module)
        if isinstance(module, mp.TopOneRouter):
            module.weight.requires_grad_(False)
    mp.PNetLlamaPreTrainedModel._init_weights = init

spec = importlib.util.spec_from_file_location("pretrain", "scripts/pretrain.py")
pretrain = importlib.util.module_from_spec(spec); spec.loader.exec_module(pretrain)
print("ROUTER_MODE", mode)
pretrain.main(sys.argv[1:])
