"""The training loss: cross-entropy summed over trained tokens, divided by the number of trained
tokens in the whole optimizer step.

    loss(step) = sum over micro-batches m, ranks r, trained positions t of CE(t)
                 / (number of trained positions over all micro-batches and ranks)

so gradient accumulation and data parallelism give the gradient of one big batch, not a mean of
per-micro-batch means (the bug fixed in transformers PR #34191; axolotl#1100).

The output head only sees trained positions. The model is run with `logits_to_keep` set to an
empty index, so it computes no logits; a forward hook on the final norm takes the hidden states
of the trained positions and `linear_cross_entropy` applies the (frozen) head chunk by chunk,
inside the model's forward (HiddenStateTap says why):

    CE = logsumexp(h W^T) - (h W^T)[target]     h: [N, H], W: [V, H]
    dCE/dh = (softmax(h W^T) - onehot(target)) W

The gradient with respect to h is computed in the forward pass, one chunk at a time, so at most
[chunk, V] logits exist at once instead of [B, T, V] (201 MB in float32 for 4 x 256 tokens of a
49k vocabulary, plus as much again for its gradient).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in float32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        # hidden: [N, H]; weight: [V, H]; targets: [N] int64, all valid
        need_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None  # [N, H]
        # [V, H] float32: only when the head trains (modules_to_save: [lm_head])
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]  # [C, H]
            t = targets[start : start + chunk]  # [C]
            logits = (h @ weight.t()).float()  # [C, V]; under autocast the matmul runs in bf16
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad or need_weight_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # [C, V], softmax in place
                probs[rows[: t.shape[0]], t] -= 1.0  # dCE/dlogits
                if need_grad:
                    grad[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)  # [C, H]
                if need_weight_grad:
                    grad_weight += probs.t() @ h.float()  # [V, H]
        ctx.save_for_backward(grad if need_grad else None, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad, grad_weight = ctx.saved_tensors
        grad_hidden = grad * grad_total.to(grad.dtype) if grad is not None else None
        grad_w = grad_weight * grad_total if grad_weight is not None else None
        return grad_hidden, grad_w, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits hidden @ weight.T against targets.

    Semantics:
        sum(F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum"))
    Args:
        hidden: Shape: `[N, H]`. Hidden states of the trained positions only.
        weight: Shape: `[V, H]`. The output head; frozen normally, trainable when it is in
            lora_modules_to_save (its float32 gradient [V, H] is then accumulated chunk by chunk).
        targets: Shape: `[N]`. Token ids, no ignore index.
    Returns:
        A float32 scalar; its gradient flows to `hidden` (and to `weight` when it requires grad).
    """
    assert hidden.dim() == 2 and targets.shape == hidden.shape[:1], (hidden.shape, targets.shape)
    chunk = max(16, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


class HiddenStateTap:
    """A forward hook on the final norm: keeps its output, or, when a loss is armed, computes the
    loss from it right there.

    Computing the loss inside the model's forward matters under FSDP: the (frozen) output head
    belongs to the root FSDP unit, whose parameters are whole only while the root's forward
    runs; afterwards each rank holds a shard. The loss function keeps dCE/dh from its forward,
    so its backward needs the head no more."""

    def __init__(self, module: torch.nn.Module):
        self.hidden: torch.Tensor | None = None
        self._armed: tuple[torch.Tensor, torch.nn.Module] | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if self._armed is None:
            self.hidden = output
            return
        targets, head = self._armed
        self._armed = None
        keep = targets != -100  # [B, T]
        if not keep.any():
            self.hidden = output.sum() * 0.0  # keeps the graph connected (DDP expects every parameter's grad)
        else:
            self.hidden = linear_cross_entropy(output[keep], head.weight, targets[keep])

    def arm(self, targets: torch.Tensor, head: torch.nn.Module) -> None:
        """The next forward computes the summed CE of its hidden states against `targets`."""
        self._armed = (targets, head)

    def take(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the model ran no forward pass through the tapped norm")
        return hidden

    def remove(self) -> None:
        self._handle.remove()


NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep index: compute no logits at all


def causal_lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(final norm, output head) of a (PEFT-wrapped) Llama-family causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    norm = getattr(getattr(base, "model", None), "norm", None)
    head = base.get_output_embeddings()
    if norm is None or head is None:
        raise RuntimeError(f"{type(base).__name__} has no model.norm / output head; only Llama-family bases train")
    return norm, head


def forward_hidden(model, tap: HiddenStateTap, batch: dict) -> torch.Tensor:
    """Run the model on a collated batch; returns the final-norm hidden states [B, T, H] (or the
    loss, when the tap was armed).

    batch: input_ids [B, T], position_ids [B, T], attention_mask [B, T] (unpacked batches only).
    use_cache=False matters beyond memory: with a cache object transformers does not derive the
    block-diagonal mask of packed rows from their position ids, and packed samples would attend
    to each other (tests/test_trainer_data.py::test_packed_samples_do_not_attend_to_each_other).
    """
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    model(**inputs, logits_to_keep=NO_LOGITS.to(batch["input_ids"].device), use_cache=False)
    return tap.take()


def token_loss_sum(model, tap: HiddenStateTap, head: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Forward one batch; returns (summed CE over its trained tokens, their count).

    batch: as for forward_hidden, plus targets [B, T] (shifted labels, -100 where no loss).
    The loss is computed by the tap inside the forward (see HiddenStateTap).
    """
    targets = batch["targets"]  # [B, T]
    count = int((targets != -100).sum())
    tap.arm(targets, head)
    loss = forward_hidden(model, tap, batch)  # a scalar: the tap computed the loss
    return loss, count
