"""The check a merged or exported model passes before it is published.

The reference is lorad serving the adapter (greedy decoding: tokens and the log-probability of
each). The candidate (a merged folder, a GGUF read back by transformers) is run teacher-forced
on the reference's tokens, so every position compares the two functions on the same input:

  * greedy agreement: the candidate's argmax is the reference's choice (at the end: an EOS);
  * log-probabilities: |log p_cand(t_j) - log p_ref(t_j)| for every generated token j.

What must hold depends on how the weights are stored (Tolerance below):
  * exact storage (float32): every position agrees and log-probs are within 1e-3;
  * 16-bit and Q8_0: log-probs within `max_logprob`, and a position may disagree only at a
    near-tie, where the candidate's own margin between its pick and the reference's is within
    `near_tie` (a tie at the noise level, as tests/test_oracle.py does for NF4);
  * Q4_0: too lossy for per-token claims on a small model, so the check is statistical: the
    mean |log-prob diff| and the fraction of agreeing positions. A layout or tokenizer error
    fails it by far (random agreement is ~0%, mean diffs of 5-10).

The numbers were measured on SmolLM2-135M with a rank-8 adapter on every projection
(benchmarks/bench_deltas.py; README "lorad merge" and "lorad export" list what each storage
showed: e.g. bf16 max 0.066, fp16 0.0056, Q8_0 0.095, Q4_0 mean 0.59 with 67% of positions
agreeing) and set with 2-5x slack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tolerance:
    max_logprob: float | None  # every position's |log-prob diff| at most this (None: not checked)
    near_tie: float | None  # a disagreeing position's margin at most this; None: no disagreement allowed
    mean_logprob: float | None = None  # mean |log-prob diff| over all positions
    min_agreement: float | None = None  # fraction of positions where the greedy picks agree


TOLERANCES = {
    "fp32": Tolerance(1e-3, None),
    "gguf-f32": Tolerance(1e-3, None),
    "fp16": Tolerance(0.03, 0.03),
    "gguf-f16": Tolerance(0.03, 0.03),
    "bf16": Tolerance(0.25, 0.25),
    "gguf-bf16": Tolerance(0.25, 0.25),
    "gguf-q8_0": Tolerance(0.3, 0.3),
    "gguf-q4_0": Tolerance(None, None, mean_logprob=1.5, min_agreement=0.4),
}

# what `lorad merge` asks the reference and the merged model (chat-templated when the base has one)
VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why do cats purr?",
    "Give me a short tip for learning to cook.",
    "What is 12 times 12?",
    "Describe the moon in one sentence.",
    "What do bees make?",
    "Suggest a name for a pet goldfish.",
)


@dataclass
class Generation:
    """A reference's greedy answer to one prompt."""

    prompt: list[int]
    tokens: list[int]  # the continuation (without the end-of-sequence token)
    logprobs: list[float]  # log p(tokens[j]) for every j
    stop_ids: tuple[int, ...] = ()  # when the answer ended on an EOS: the ids that end a sequence
    choices: list[int] | None = None  # the reference's greedy pick at each position; None = tokens

    @property
    def positions(self) -> int:
        """Positions compared: every token, plus the stop when the answer ended on an EOS."""
        return len(self.tokens) + (1 if self.stop_ids else 0)


def encode_prompts(tokenizer, prompts=VERIFY_PROMPTS) -> list[list[int]]:
    out = []
    for text in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            out.append(list(tokenizer(text)["input_ids"]))
    return out


@torch.no_grad()
def forced_logprobs(model, generations: list[Generation]) -> list[torch.Tensor]:
    """Teacher-forced log-softmax rows [g.positions, vocab] float32 of `model` on each generation."""
    rows = []
    for g in generations:
        ids = torch.tensor([g.prompt + g.tokens])
        start = len(g.prompt) - 1
        logits = model(ids).logits[0, start : start + g.positions].float()
        rows.append(torch.log_softmax(logits, dim=-1))
    return rows


def as_reference(generations: list[Generation], rows: list[torch.Tensor]) -> list[Generation]:
    """A candidate's teacher-forced results as the reference of the next check (GGUF vs merged folder)."""
    out = []
    for g, lp in zip(generations, rows):
        n = len(g.tokens)
        logprobs = lp[torch.arange(n), torch.tensor(g.tokens, dtype=torch.long)].tolist() if n else []
        out.append(Generation(g.prompt, list(g.tokens), logprobs, g.stop_ids, choices=lp.argmax(-1).tolist()[:n]))
    return out


@dataclass
class PromptCheck:
    index: int
    positions: int
    agreed: int  # positions where the candidate's greedy pick is the reference's
    first_divergence: int | None
    worst_margin: float | None  # largest candidate margin (its pick over the reference's) where they differ
    max_logprob_diff: float
    mean_logprob_diff: float

    @property
    def exact(self) -> bool:
        return self.agreed == self.positions


@dataclass
class VerifyReport:
    label: str  # what was compared, e.g. "merged folder (bf16) vs lorad serving the adapter"
    storage: str
    tolerance: Tolerance
    prompts: list[PromptCheck] = field(default_factory=list)

    @property
    def max_logprob_diff(self) -> float:
        return max((p.max_logprob_diff for p in self.prompts), default=0.0)

    @property
    def mean_logprob_diff(self) -> float:
        total = sum(p.positions for p in self.prompts)
        return sum(p.mean_logprob_diff * p.positions for p in self.prompts) / total if total else 0.0

    @property
    def agreement(self) -> float:
        total = sum(p.positions for p in self.prompts)
        return sum(p.agreed for p in self.prompts) / total if total else 0.0

    @property
    def exact_prompts(self) -> int:
        return sum(p.exact for p in self.prompts)

    @property
    def failures(self) -> list[str]:
        tol, out = self.tolerance, []
        for p in self.prompts:
            if tol.max_logprob is not None and p.max_logprob_diff > tol.max_logprob:
                out.append(f"prompt {p.index}: log-probs differ by {p.max_logprob_diff:.3g} > {tol.max_logprob:g}")
            if tol.min_agreement is None and not p.exact and (tol.near_tie is None or p.worst_margin > tol.near_tie):
                margin = "" if p.worst_margin is None else f" by a margin of {p.worst_margin:.3g}"
                out.append(f"prompt {p.index}: greedy token {p.first_divergence} differs{margin}")
        if tol.mean_logprob is not None and self.mean_logprob_diff > tol.mean_logprob:
            out.append(f"mean log-prob diff {self.mean_logprob_diff:.3g} > {tol.mean_logprob:g}")
        if tol.min_agreement is not None and self.agreement < tol.min_agreement:
            out.append(f"greedy picks agree at {self.agreement:.0%} of positions < {tol.min_agreement:.0%}")
        return out

    @property
    def passed(self) -> bool:
        return bool(self.prompts) and not self.failures

    def summary(self) -> str:
        state = "passed" if self.passed else "FAILED"
        return (f"{self.label}: {state}: greedy tokens equal on {self.exact_prompts}/{len(self.prompts)} prompts "
                f"({self.agreement:.0%} of positions), log-prob diff max {self.max_logprob_diff:.2e} "
                f"mean {self.mean_logprob_diff:.2e}")

    def as_dict(self) -> dict:
        return {
            "label": self.label, "storage": self.storage, "passed": self.passed, "tolerance": vars(self.tolerance),
            "prompts": len(self.prompts), "exact_prompts": self.exact_prompts, "agreement": self.agreement,
            "max_logprob_diff": self.max_logprob_diff, "mean_logprob_diff": self.mean_logprob_diff,
            "failures": self.failures, "per_prompt": [vars(p) for p in self.prompts],
        }


def compare(reference: list[Generation], rows: list[torch.Tensor], *, storage: str, label: str) -> VerifyReport:
    """Check a candidate's teacher-forced rows (forced_logprobs) against the reference."""
    report = VerifyReport(label=label, storage=storage, tolerance=TOLERANCES[storage])
    for i, (g, lp) in enumerate(zip(reference, rows)):
        choices = g.choices if g.choices is not None else g.tokens
        picks = lp.argmax(-1).tolist()  # [positions]
        agreed, first, worst = 0, None, None
        for j in range(g.positions):
            wanted = [choices[j]] if j < len(g.tokens) else list(g.stop_ids)
            if picks[j] in wanted:
                agreed += 1
                continue
            margin = float(lp[j, picks[j]] - lp[j, wanted].max())
            first = j if first is None else first
            worst = margin if worst is None else max(worst, margin)
        n = len(g.logprobs)
        diffs = torch.zeros(1, dtype=torch.float64)
        if n:
            cand = lp[torch.arange(n), torch.tensor(g.tokens[:n], dtype=torch.long)].double()
            diffs = (cand - torch.tensor(g.logprobs, dtype=torch.float64)).abs()
        report.prompts.append(PromptCheck(i, g.positions, agreed, first, worst, float(diffs.max()),
                                          float(diffs.mean())))
    return report
