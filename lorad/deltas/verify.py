"""The check a merged or exported model passes before it is published.

The reference is lorad serving the adapter (greedy decoding: tokens and the log-probability of
each). The candidate (a merged folder, a GGUF read back by transformers) is run teacher-forced
on the reference's tokens, so every position compares the two functions on the same input:

  * greedy agreement: at every position the candidate's argmax is the reference's choice;
  * log-probabilities: |log p_cand(t_j) - log p_ref(t_j)| <= tolerance at every position.

Where storage is lossy (16-bit weights, Q8_0 / Q4_0) a near-tie may flip: a divergence is then
accepted when the candidate's own margin between its choice and the reference's is within the
tolerance (a tie at the noise level, as tests/test_oracle.py does for NF4); with exact storage
(float32) every prompt must agree at every position.

Tolerances, in log-probability (natural log) per generated token, measured on SmolLM2-135M with a
rank-8 adapter on all projections (README "lorad merge"; worst case seen x ~3):
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# storage -> log-prob tolerance (see the module docstring for how they were set)
TOLERANCE = {
    "fp32": 1e-3,
    "fp16": 0.05,
    "bf16": 0.25,
    "gguf-f32": 1e-3,
    "gguf-f16": 0.05,
    "gguf-bf16": 0.25,
    "gguf-q8_0": 0.3,
    "gguf-q4_0": 3.0,
}
EXACT_STORAGE = ("fp32", "gguf-f32")

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
    exact: bool  # the candidate's greedy pick equals the reference's at every position
    first_divergence: int | None
    margin: float | None  # candidate's log p(its pick) - log p(reference's pick) at the divergence
    max_logprob_diff: float


@dataclass
class VerifyReport:
    label: str  # what was compared, e.g. "merged folder (bf16) vs lorad serving the adapter"
    storage: str
    tolerance: float
    prompts: list[PromptCheck] = field(default_factory=list)

    @property
    def allow_near_ties(self) -> bool:
        return self.storage not in EXACT_STORAGE

    @property
    def max_logprob_diff(self) -> float:
        return max((p.max_logprob_diff for p in self.prompts), default=0.0)

    @property
    def exact_prompts(self) -> int:
        return sum(p.exact for p in self.prompts)

    @property
    def failures(self) -> list[str]:
        out = []
        for p in self.prompts:
            if p.max_logprob_diff > self.tolerance:
                out.append(f"prompt {p.index}: log-probs differ by {p.max_logprob_diff:.3g} > {self.tolerance:g}")
            if not p.exact and not (self.allow_near_ties and p.margin is not None and p.margin <= self.tolerance):
                margin = "" if p.margin is None else f" by a margin of {p.margin:.3g}"
                out.append(f"prompt {p.index}: greedy token {p.first_divergence} differs{margin}")
        return out

    @property
    def passed(self) -> bool:
        return bool(self.prompts) and not self.failures

    def summary(self) -> str:
        state = "passed" if self.passed else "FAILED"
        return (f"{self.label}: {state}: greedy tokens equal on {self.exact_prompts}/{len(self.prompts)} prompts, "
                f"max |log-prob diff| {self.max_logprob_diff:.2e} (tolerance {self.tolerance:g})")

    def as_dict(self) -> dict:
        return {
            "label": self.label, "storage": self.storage, "passed": self.passed, "tolerance": self.tolerance,
            "prompts": len(self.prompts), "exact_prompts": self.exact_prompts,
            "max_logprob_diff": self.max_logprob_diff, "failures": self.failures,
            "per_prompt": [vars(p) for p in self.prompts],
        }


def compare(reference: list[Generation], rows: list[torch.Tensor], *, storage: str, label: str) -> VerifyReport:
    """Check a candidate's teacher-forced rows (forced_logprobs) against the reference."""
    report = VerifyReport(label=label, storage=storage, tolerance=TOLERANCE[storage])
    for i, (g, lp) in enumerate(zip(reference, rows)):
        choices = g.choices if g.choices is not None else g.tokens
        picks = lp.argmax(-1).tolist()  # [positions]
        diverge, margin = None, None
        for j in range(g.positions):
            wanted = [choices[j]] if j < len(g.tokens) else list(g.stop_ids)
            if picks[j] not in wanted:
                diverge = j
                margin = float(lp[j, picks[j]] - lp[j, wanted].max())
                break
        n = len(g.logprobs)
        diff = 0.0
        if n:
            cand = lp[torch.arange(n), torch.tensor(g.tokens[:n], dtype=torch.long)].double()
            diff = float((cand - torch.tensor(g.logprobs, dtype=torch.float64)).abs().max())
        report.prompts.append(PromptCheck(i, g.positions, diverge is None, diverge, margin, diff))
    return report
