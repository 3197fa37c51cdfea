"""What a quantized model loses, measured against its 16-bit baseline on the same tokens.

Two views, both used by the side-by-side tab:

* **Free-running** (what students see): each pane decodes on its own; :func:`token_agreement` compares a pane's
  token ids with the baseline's position by position (greedy decoding makes the baseline's text a fixed
  reference) and finds the first position where they part.
* **Teacher-forced** (what the numbers mean): both models read the *same* token sequence — the baseline's own
  answer after the prompt, or a short reference text (``assets/reference_text.txt``) — and at every position
  we compare their next-token distributions: KL(P_baseline ‖ P_pane) in nats, whether their top-1 tokens agree,
  and each model's perplexity on the sequence. This is llama.cpp's ``perplexity --kl-divergence`` idea,
  per token and in the browser. KL = 0 and 100 % agreement for two copies of one model; quantization noise
  raises KL where the models hesitate between tokens.

Everything torch runs on the engine's compute thread (backends' ``score``); :func:`compare_distributions` is a
pure function of two log-probability tensors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError

REFERENCE_TEXT_PATH = Path(__file__).resolve().parent.parent / "assets" / "reference_text.txt"
PROBE = "Quantization maps weights to fewer bits: 4-bit NF4, 8-bit, GGUF Q4_K_M."


def reference_text() -> str:
    """The short reference text shipped in assets/ (an original paragraph, ~250 tokens)."""
    return REFERENCE_TEXT_PATH.read_text(encoding="utf-8").strip()


@dataclass
class Agreement:
    """Free-running comparison of a pane's tokens with the baseline's."""

    compared: int  # positions both runs produced
    identical: int
    first_divergence: Optional[int]  # index of the first differing token (None: none within `compared`)
    same: list = field(default_factory=list)  # per pane token: True when equal to the baseline's at that position

    @property
    def percent(self) -> Optional[float]:
        return None if not self.compared else 100.0 * self.identical / self.compared


def token_agreement(baseline: Sequence[int], pane: Sequence[int]) -> Agreement:
    """Position-by-position identity of two token sequences (``same`` has one flag per pane token; tokens past
    the baseline's end count as different)."""
    n = min(len(baseline), len(pane))
    same = [i < len(baseline) and int(pane[i]) == int(baseline[i]) for i in range(len(pane))]
    first = next((i for i in range(n) if not same[i]), None)
    if first is None and len(pane) != len(baseline):
        first = n
    return Agreement(compared=n, identical=sum(same[:n]), first_divergence=first, same=same)


@dataclass
class Divergence:
    """Teacher-forced comparison of a pane with the baseline on one token sequence."""

    tokens: int
    kl: list  # per token, nats, KL(P_baseline || P_pane)
    mean_kl: float
    max_kl: float
    top1_agreement: float  # percent of positions where both models' most likely token is the same
    ppl_baseline: float
    ppl_pane: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_distributions(base_lp, pane_lp, targets: Sequence[int]) -> Divergence:
    """KL, top-1 agreement and perplexities from two ``[n, vocab]`` log-probability tensors scoring ``targets``.

    Vocabularies padded to different sizes are cut to the common part (padding rows hold no real tokens)."""
    import torch

    if base_lp.shape[0] != pane_lp.shape[0] or base_lp.shape[0] != len(targets) or not len(targets):
        raise InputError(f"Cannot compare {base_lp.shape[0]} and {pane_lp.shape[0]} positions for {len(targets)} "
                         "tokens.")
    v = min(base_lp.shape[1], pane_lp.shape[1])
    b = torch.log_softmax(base_lp[:, :v].float(), dim=-1)
    p = torch.log_softmax(pane_lp[:, :v].float(), dim=-1)
    kl = (b.exp() * (b - p)).sum(-1).clamp_min(0.0)  # tiny negative values are rounding
    t = torch.tensor([int(x) for x in targets])
    if int(t.max()) >= v:
        raise InputError("A token id is outside the models' common vocabulary; their tokenizers differ.")
    nll_b = -b.gather(1, t[:, None]).squeeze(1)
    nll_p = -p.gather(1, t[:, None]).squeeze(1)
    top1 = (b.argmax(-1) == p.argmax(-1)).float().mean().item() * 100.0
    return Divergence(tokens=len(targets), kl=[round(float(x), 6) for x in kl], mean_kl=float(kl.mean()),
                      max_kl=float(kl.max()), top1_agreement=top1, ppl_baseline=_ppl(float(nll_b.mean())),
                      ppl_pane=_ppl(float(nll_p.mean())))


def _ppl(mean_nll: float) -> float:
    """exp(mean negative log-likelihood); infinite past float range (a model that rules the text out)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def same_vocabulary(backend_a, loaded_a, backend_b, loaded_b) -> bool:
    """Whether two loaded models tokenize a probe text to the same ids (so one's tokens can feed the other)."""
    return backend_a.tokenize(loaded_a, PROBE) == backend_b.tokenize(loaded_b, PROBE)
