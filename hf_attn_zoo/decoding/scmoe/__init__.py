"""SCMoE: self-contrast decoding of MoE models, from "Unchosen Experts Can Contribute Too: Unleashing MoE Models'
Power by Self-Contrast" (arXiv:2405.14507, NeurIPS 2024).

At every step the same MoE model runs twice: a **strong** activation (its normal top-k routing) and a **weak** one
(a different routing in every MoE layer, e.g. each token sent to its rank-2 expert alone). The next token maximises
the contrastive score over the tokens the strong model finds plausible (Eq. 5-6):

    V_alpha = {i : p_s(i) >= alpha * max_j p_s(j)}
    s(i)    = (1 + beta) * log p_s(i) - beta * log p_w(i)    for i in V_alpha,   -inf otherwise

Defaults are the paper's: alpha = 0.1, beta = 0.5, weak = rank-2 (Mixtral). Greedy decoding on `s`; with
`do_sample=True` tokens are drawn from softmax(s) (the paper's `scmoe_with_sampling`). Decoding only: no training,
no new weights. The paper tuned beta on the test sets; `pick_beta` tunes it on a held-out slice instead.

How it works here (one batched forward per step, unlike the official code's two sequential passes):

- the batch is duplicated, `[x; x]` (2B rows), with one `DynamicCache` of batch 2B; rows 0..B-1 are the strong
  pass, rows B..2B-1 the weak pass, each with its own cache rows;
- `hf_attn_zoo.moe.with_row_override(model, RoutingOverride(rank=2), rows=range(B, 2B))` re-routes the
  weak rows in every MoE layer while the strong rows keep the model's own routing (`hf_attn_zoo.moe.routing` has
  the per-family routing rules);
- on a model that already carries routing overrides for every row (a MoTE patch, `switch_experts`, `set_routing`
  without `rows`), the strong rows keep them and the weak rows get them merged with the weak routing: switched-off
  experts stay off (rank-2 is the 2nd expert among those left), forced experts stay on, gains stay; an impossible
  merge (e.g. rank-k where experts are forced or dropped) raises `InvalidOptionError` naming the layer. The
  installed overrides are restored exactly afterwards (also on error); their `record` / `on_route` see all 2B rows;
- left padding is handled like `generate`: position ids from the attention mask (cumsum - 1, padding at 0), the
  mask grows by one column per step, and a finished row keeps receiving the pad token.

Weak routings (`SCMoEConfig.weak`):

- `"rank"` (`weak_rank`, default 2): each token goes to the expert ranked `weak_rank` (1-based) alone, weight 1
  (paper Eq. 4, the Mixtral setting of every main result);
- `"top1"`: top-1 routing with the family's own weights (renormalised iff the family renormalises: always for
  Mixtral, iff `norm_topk_prob` for Qwen/OLMoE);
- `"top_m"` (`m`): top-m routing with the family's weights (the paper's DeepSeekMoE setting, where
  `norm_topk_prob=False` leaves them unnormalised). Shared experts (Qwen2-MoE, DeepSeek-V3) stay on in both passes.

Departures from the official code (`DavidFanzz/SCMoE`, `decodingmethod/moe_utils.py`): the EOS token is allowed by
default (`ban_eos=False`; the official CLI bans it unless `--early_stop`), and the per-pass temperatures
(`--cd_tt`, `--cd_st`, both 1.0 by default) are not exposed. Scores use log-probabilities, not raw logits; the two
differ by a per-row constant, so greedy choices and softmax(s) are the same.

Entry points: `scmoe_generate` (greedy, returns ids like `generate`), `model.generate(..., custom_generate=
scmoe_decode, ...)`, `model.generate(..., custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)`, and
`scmoe_logprobs` for contrastive log-likelihood scoring. lm-eval: `hf_attn_zoo.eval_harness.lm_model` (`scmoe=true`).
`pick_beta` chooses beta on held-out examples (GSM8K by default, `hf_attn_zoo.eval_harness.gsm8k`).

Modules: `config` (SCMoEConfig, weak-routing specs), `contrast` (the weak routing on the doubled batch, the score, the
paired forward, log-likelihood scoring), `decode` (the `generate` decoding loop and its entry points), `beta_search`
(`pick_beta`). `hf_attn_zoo.methods()` lists SCMoE as a decoding method (`hf_attn_zoo.decoding.registry`).

Cost: one forward of 2B rows per step, whose weak rows also run experts the strong rows did not pick. On a 2-core
CPU, where a doubled batch alone costs 1.2-1.6x (MKL's small-matrix GEMMs), SCMoE decodes at 0.58x (batch 1) and
0.68x (batch 4) greedy tokens/s, against 0.48x and 0.50x for two sequential passes (`benchmarks/scmoe_decode.py`);
on a GPU at small batch, where decoding is bound by weight reads and launches, the doubled rows should cost less
(not measured yet).

Limits: routing overrides installed for some rows only (`RoutingOverride.rows`) raise `PatchConflictError` (SCMoE
needs the batch rows for its two passes); decoding cannot restart from a non-empty cache; beam search is not
supported (greedy or sampling only).
"""

from __future__ import annotations

from ..registry import DecodingMethod, register_decoding
from .beta_search import pick_beta
from .config import SCMoEConfig, parse_weak
from .contrast import SCMoEOutput, check_model, contrastive_scores, scmoe_forward, scmoe_logprobs
from .decode import CUSTOM_GENERATE_DIR, move_stop_strings, scmoe_decode, scmoe_generate

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "SCMoEConfig",
    "SCMoEOutput",
    "check_model",
    "contrastive_scores",
    "move_stop_strings",
    "parse_weak",
    "pick_beta",
    "scmoe_decode",
    "scmoe_forward",
    "scmoe_generate",
    "scmoe_logprobs",
]

register_decoding(
    DecodingMethod(
        name="scmoe",
        summary="SCMoE self-contrast decoding (arXiv:2405.14507): the next token maximises (1 + beta) log p_strong - "
        "beta log p_weak over the alpha-plausible tokens, weak = another routing of the same MoE model.",
        config_class=SCMoEConfig,
        usage="hf_attn_zoo.decoding.scmoe_generate(model, ids, mask, beta=0.5), model.generate(..., "
        "custom_generate=hf_attn_zoo.decoding.scmoe_decode), or lm-eval --model_args pretrained=DIR,scmoe=true",
        paper="Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by Self-Contrast (arXiv:2405.14507, "
        "NeurIPS 2024)",
    )
)
