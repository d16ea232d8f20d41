"""Losses of MM-GEM, kept apart from the model: symmetric InfoNCE and caption cross-entropy.

Remote code (travels with the weights): torch imports only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather `features` [N_local, D] from every rank, keeping the autograd graph to the local rows.

    Ranks may hold different row counts (e.g. a different number of regions), so rows are padded to the largest
    count before the collective and the padding is dropped afterwards.

    Returns:
        The concatenation over ranks [N_global, D] and the offset of this rank's rows in it.
    """
    rank, world_size = _distributed_world()
    if world_size == 1:
        return features, 0
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = F.pad(features, (0, 0, 0, max(counts) - features.shape[0]))
    # torch.distributed.nn's all_gather backpropagates into every rank's local rows (summed over ranks); with the
    # DDP gradient average this gives exactly the gradient of the loss over the global batch.
    from torch.distributed.nn.functional import all_gather

    gathered = all_gather(padded)
    gathered = torch.cat([chunk[:n] for chunk, n in zip(gathered, counts)], dim=0)
    return gathered, sum(counts[:rank])


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the (global) batch: loss = L_image->text + L_text->image.

    Args:
        image_embeds: L2-normalised image (or region) embeddings [N, D].
        text_embeds: L2-normalised text embeddings [N, D]; row i describes image row i.
        logit_scale: the temperature multiplier exp(t), a scalar tensor.

    Returns:
        (loss, logits_per_image [N, N_global], logits_per_text [N, N_global]). In a distributed run the rows are
        this rank's and the columns the whole gathered batch; the loss is the mean over this rank's rows, which
        averaged over ranks (as DDP does) equals the loss of the concatenated batch.
    """
    all_image, offset = gather_with_grad(image_embeds)
    all_text, _ = gather_with_grad(text_embeds)
    scale = logit_scale.float()
    logits_per_image = scale * image_embeds.float() @ all_text.float().t()  # [N, N_global]
    logits_per_text = scale * text_embeds.float() @ all_image.float().t()  # [N, N_global]
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    loss = F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)
    return loss, logits_per_image, logits_per_text


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the labelled tokens.

    Args:
        logits: [N, L, V] language-model logits over the caption sequence.
        labels: [N, L] token ids to predict, `-100` where no loss is taken (prompt, visual tokens, padding).
            Position t predicts `labels[:, t + 1]` (the shift happens here, as in transformers' causal LMs).
    """
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [N*(L-1), V]
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # [N*(L-1)]
    if not (shift_labels != IGNORE_INDEX).any():
        # No caption token in the batch: a zero that still depends on the logits keeps DDP and autograd happy.
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
