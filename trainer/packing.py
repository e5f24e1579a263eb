"""Samples -> rows -> batches, with the targets already shifted, and the sampler that orders rows.

A *row* is what one line of a batch holds: one sample, or with sample_packing several samples
laid end to end. Two rules keep packed samples apart:
  * position ids restart at 0 for every sample, and no attention mask is passed, so
    transformers builds a block-diagonal causal mask from the position ids (no token attends
    across a sample boundary; tests/test_trainer_data.py checks packed logits == unpacked);
  * targets are shifted inside each sample: the last token of a sample predicts nothing, never
    the first token of the next one.

Targets are stored shifted (targets[t] = the label of token t+1, or -100), so the number of
trained tokens of a batch is simply (targets != -100).sum(): that count is what the loss of a
whole optimizer step is divided by (see trainer/loss.py).
"""

from __future__ import annotations

import torch

from lorad.trainer.data import IGNORE, Sample


def shifted_targets(sample: Sample) -> list[int]:
    """targets[t] = labels[t + 1] within the sample; the last position has none."""
    return sample.labels[1:] + [IGNORE]


def pack_rows(samples: list[Sample], sequence_len: int) -> list[list[Sample]]:
    """First-fit-decreasing bin packing into rows of at most sequence_len tokens.

    Deterministic (ties broken by input order), so a resumed run packs identically."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(sequence_len - n)
    return [[samples[i] for i in sorted(row)] for row in rows]


def resolve_packing(setting, samples: list[Sample], sequence_len: int) -> tuple[bool, str]:
    """sample_packing: true / false as given; auto packs when the samples average at most half of
    sequence_len (two or more fit in a row on average), where packing removes most padding.
    Returns the decision and a sentence saying why."""
    if setting is True:
        return True, "on (sample_packing: true)"
    if setting is False:
        return False, "off (sample_packing: false)"
    mean = sum(len(s.input_ids) for s in samples) / max(1, len(samples))
    if mean <= sequence_len / 2:
        return True, (f"on (auto: samples average {mean:.0f} tokens, at most half of sequence_len {sequence_len}; "
                      "sample_packing: false turns it off)")
    return False, f"off (auto: samples average {mean:.0f} tokens, more than half of sequence_len {sequence_len})"


def rows_of(samples: list[Sample], sequence_len: int, packing: bool) -> list[list[Sample]]:
    return pack_rows(samples, sequence_len) if packing else [[s] for s in samples]


class RowCollator:
    """list of rows -> a batch dict of tensors, padded on the right to the longest row.

    Batch keys (B rows, T = longest row):
      input_ids    [B, T] int64, pad_id after the row's end
      targets      [B, T] int64, shifted labels, -100 where no loss
      position_ids [B, T] int64, restarting at 0 for every sample (padding counts as one more)
      attention_mask [B, T] int64, only when not packing (1 on real tokens)
      num_tokens   [] int64, real (non-padding) tokens, for tokens/s
    """

    def __init__(self, pad_id: int, packing: bool):
        self.pad_id = pad_id
        self.packing = packing

    def __call__(self, rows: list[list[Sample]]) -> dict[str, torch.Tensor]:
        lengths = [sum(len(s.input_ids) for s in row) for row in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [B, T]
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
        positions = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for b, row in enumerate(rows):
            at = 0
            for s in row:
                n = len(s.input_ids)
                input_ids[b, at : at + n] = torch.tensor(s.input_ids)
                targets[b, at : at + n] = torch.tensor(shifted_targets(s))
                positions[b, at : at + n] = torch.arange(n)
                at += n
            positions[b, at:] = torch.arange(width - at)  # padding: a separate pseudo-sample
        batch = {
            "input_ids": input_ids,
            "targets": targets,
            "position_ids": positions,
            "num_tokens": torch.tensor(sum(lengths)),
        }
        if not self.packing:
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
            for b, n in enumerate(lengths):
                mask[b, :n] = 1
            batch["attention_mask"] = mask
        return batch


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of the rows that depends only on (seed, epoch).

    The order does not consume the global RNG, so it is the same in an uninterrupted run and in
    a run resumed mid-epoch (torch's RandomSampler draws its seed from the global generator,
    whose state at an epoch start differs between the two)."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=g).tolist())


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[list[Sample]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[Sample]:
        return self.rows[i]
