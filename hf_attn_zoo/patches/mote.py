"""MoTE: expert switching, from "Mixture of Tunable Experts - Behavior Modification of DeepSeek-R1 at Inference
Time" (arXiv:2502.11096).

MoTE changes what an MoE model does by switching individual routed experts off or on at inference time, without
training. The experts come from fTRI profiling (`hf_attn_zoo.analysis.profile_experts`: experts a behaviour class
of prompts selects more often than the others, ranked across the whole model); switching off the top 10 refusal
experts of DeepSeek-R1 (0.07 % of its 14,848) cut refusals by about half with no MT-Bench loss.

What it replaces: the routing of each MoE layer's router (`hf_attn_zoo.moe.set_routing`: the router instance's
`forward` is wrapped, no module, parameter or buffer is added, the state dict is unchanged). The experts, the
router logits and every weight stay as they are. Training-free; with nothing switched the model is unchanged.

Options (per MoE layer: `{layer: [experts]}`, layer keys are decoder-layer indices, as ints or strings, or "all"):

- `off`: the expert's router logit counts as -inf *before* the top-k, so the next-ranked expert takes its place
  (the number of experts per token is unchanged; softmax families also leave it out of the softmax). This is how
  we read MoTE's "switch off"; the paper's exact rule is not public and secondary sources disagree, so the other
  reading is `drop`.
- `drop`: removed *after* the top-k with renormalisation of the remaining weights where the family renormalises;
  no replacement, fewer experts run.
- `on`: always in the top-k (MoTE's "force on"), replacing the lowest-ranked (DeepSeek-V3: its group is forced).
- `gain`: `{layer: {expert: factor}}`, a factor >= 0 on the expert's final routing weight.

The recorded options are JSON-stable (string layer keys, sorted lists), so `save_pretrained` followed by
`hf_attn_zoo.from_pretrained` re-applies exactly the same switches. In YAML (recipes), quote the option names,
`"off": {all: [1]}`: YAML 1.1 reads a bare `off` / `on` key as a boolean. `layers=` limits the patch: `"all"` then
means the MoE layers among the selected ones, and a specific layer outside the selection is an error. Temporary
switches (on a patched or a plain model): `hf_attn_zoo.moe.switch_experts`; profile -> switches:
`hf_attn_zoo.moe.experts_to_switch`. One model holds one set of switches: a second mote patch (or a `set_routing`
while the patch is on) is refused; temporary changes go through `switch_experts`.

Official code: none published (the authors patched vLLM); this follows the paper's abstract and HF blog post.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from ..errors import PatchConflictError
from ..families.spec import FamilySpec
from ..moe.rules import missing_rule_reason, moe_families_with_rules, routing_rule
from ..moe.switching import canonical_switches, install, installed_switches, resolve_switches, uninstall
from ..registry import Capabilities, Patch, PatchConfig, PatchHandle, register_patch

__all__ = ["MoTEConfig", "MoTEPatch"]

_LAYER_KEYS = "layer keys: decoder-layer index (int or string, as JSON writes it) or 'all' (every patched MoE layer)"


@dataclass
class MoTEConfig(PatchConfig):
    off: dict | None = field(
        default=None,
        metadata={
            "help": "experts to switch off, {layer: [experts]}: masked before the top-k, the next-ranked "
            f"expert takes the place (MoTE). {_LAYER_KEYS}."
        },
    )
    drop: dict | None = field(
        default=None,
        metadata={
            "help": "experts to drop, {layer: [experts]}: removed after the top-k, the remaining weights "
            "renormalised where the family renormalises; no replacement (fewer experts run)."
        },
    )
    on: dict | None = field(
        default=None,
        metadata={
            "help": "experts to force on, {layer: [experts]}: always selected, replacing the lowest-ranked "
            "(at most top-k per layer; DeepSeek-V3: within topk_group groups)."
        },
    )
    gain: dict | None = field(
        default=None,
        metadata={
            "help": "routing-weight factors, {layer: {expert: factor}} (finite, >= 0): scale a selected "
            "expert's weight; a specific layer's factor wins over 'all'."
        },
    )


@register_patch
class MoTEPatch(Patch):
    name = "mote"
    summary = (
        "MoTE expert switching: switch MoE experts off (next one takes the place), drop them, force them on "
        "or re-weight them, per layer; training-free."
    )
    config_class = MoTEConfig
    capabilities = Capabilities(training_free=True, new_params=False, kv_cache=True, generate=True)
    targets = ("router",)

    def check(self, family: FamilySpec, model_config: PretrainedConfig) -> str | None:
        if family.mlp.kind != "moe":
            moe = ", ".join(moe_families_with_rules())
            return f"its MLPs are dense, so it has no experts to switch (MoE families: {moe})"
        if routing_rule(family) is None:
            return missing_rule_reason(family)
        return None

    def validate(self, config: MoTEConfig, family: FamilySpec, model_config: PretrainedConfig) -> MoTEConfig:
        return MoTEConfig(**canonical_switches("mote", config.off, config.drop, config.on, config.gain))

    def apply(self, model, config: MoTEConfig, family: FamilySpec, layers: list[int], handle: PatchHandle) -> None:
        switches = {"off": config.off, "drop": config.drop, "on": config.on, "gain": config.gain}
        plan = resolve_switches(model, switches, "mote", layers)
        if installed_switches(model) is not None:
            raise PatchConflictError(
                "mote: this model already carries expert switches (a mote patch, or an active switch_experts "
                "block); put every switch in one mote patch, or unpatch first"
            )
        # validates every layer and expert before a router is touched (nothing changes on error)
        state = install(model, plan, "mote", owner="mote")
        handle.on_revert(lambda: uninstall(model, state))

    def neutral_config(self, family: FamilySpec, model_config: PretrainedConfig) -> MoTEConfig:
        return MoTEConfig()
