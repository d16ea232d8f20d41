"""Losses of MM-GEM, kept apart from the model: symmetric InfoNCE and caption cross-entropy.

Both losses are normalised over the *global* batch. In a distributed run each rank returns its share of the global
mean times the world size: DDP averages the gradients over ranks (and the Trainer averages the logged losses), so
what is optimised is exactly the loss of the concatenated batch, whatever the number of rows (images, regions,
caption tokens) each rank holds.

Remote code (travels with the weights): torch imports only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100
# A row key that matches nothing (e.g. the image key of a region row: regions are not repeated whole images).
NO_KEY = -1


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _row_counts(rows: int, device: torch.device) -> list[int]:
    """Every rank's row count (an all-gather of one integer)."""
    count = torch.tensor([rows], device=device)
    counts = [torch.zeros_like(count) for _ in range(_distributed_world()[1])]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def _gather_rows(tensor: torch.Tensor, counts: list[int], with_grad: bool) -> torch.Tensor:
    """All-gather [N_rank, ...] tensors of different row counts: pad to the largest count, gather, drop the padding."""
    padded = F.pad(tensor, (0, 0) * (tensor.ndim - 1) + (0, max(counts) - tensor.shape[0]))
    if with_grad:
        # torch.distributed.nn's all_gather sends each rank's gradient on the gathered rows back to the rank that owns
        # them (summed over ranks): with the DDP gradient average and the world-size factor of the losses below, this
        # is exactly the gradient of the loss over the global batch.
        from torch.distributed.nn.functional import all_gather

        chunks = all_gather(padded)
    else:
        chunks = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(chunks, padded.contiguous())
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, counts)], dim=0)


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather `features` [N_local, D] from every rank, keeping the autograd graph to the local rows.

    Ranks may hold different row counts (a different number of regions, say): the counts are gathered first, rows
    are padded to the largest count for the collective and the padding is dropped afterwards.

    Returns:
        The concatenation over ranks [N_global, D] and the offset of this rank's rows in it.
    """
    rank, world_size = _distributed_world()
    if world_size == 1:
        return features, 0
    counts = _row_counts(features.shape[0], features.device)
    return _gather_rows(features, counts, with_grad=True), sum(counts[:rank])


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """All-gather integer row keys [N_local] (no gradient), in the row order of `gather_with_grad`."""
    if _distributed_world()[1] == 1:
        return keys
    return _gather_rows(keys, _row_counts(keys.shape[0], keys.device), with_grad=False)


_KEY_BITS = (1 << 62) - 1  # keys are non-negative, so they never equal NO_KEY
_PIXEL_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def token_row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A key [N] per text row: equal exactly when the rows hold the same tokens (padding and its side ignored).

    The fallback when no normalised-text keys are given: identical tokenised texts are the same thing.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = [tuple(ids[keep].tolist()) for ids, keep in zip(input_ids.cpu(), mask.cpu())]
    # Python hashes tuples of ints the same way in every process (PYTHONHASHSEED only salts str and bytes).
    return torch.tensor([hash(row) & _KEY_BITS for row in rows], dtype=torch.long, device=input_ids.device)


def pixel_row_keys(pixel_values: torch.Tensor) -> torch.Tensor:
    """A key [B] per image: equal exactly when the images' pixel values are bit-identical (a repeated image).

    A fixed random linear hash of the float bits, computed where the pixels are (no copy to the host).
    """
    bits = pixel_values.detach().float().reshape(pixel_values.shape[0], -1).view(torch.int32).long()  # [B, P]
    cache_key = (bits.shape[1], str(bits.device))
    if cache_key not in _PIXEL_WEIGHTS:
        generator = torch.Generator().manual_seed(0)
        weights = torch.randint(1, 1 << 62, (bits.shape[1],), generator=generator, dtype=torch.long)
        _PIXEL_WEIGHTS[cache_key] = weights.to(bits.device)
    return (bits * _PIXEL_WEIGHTS[cache_key]).sum(dim=1) & _KEY_BITS  # int64 arithmetic wraps: [B]


def false_negative_mask(row_keys: list[torch.Tensor], column_keys: list[torch.Tensor], offset: int) -> torch.Tensor:
    """Where a column is the same thing as a row without being its own pair: left out of the row's softmax.

    Row i (global row `offset + i`) and column j are the same thing when any pair of keys matches (identical
    normalised texts, or the same source image), `NO_KEY` matching nothing. The diagonal stays: it is the target.

    Args:
        row_keys: key tensors [N_local] of this rank's rows.
        column_keys: the same keys gathered over the global batch, [N_global] each.
        offset: position of this rank's first row among the global rows.

    Returns:
        A bool mask [N_local, N_global], True where the logit is dropped.
    """
    rows = row_keys[0].shape[0]
    columns = column_keys[0].shape[0]
    mask = torch.zeros(rows, columns, dtype=torch.bool, device=row_keys[0].device)
    for local, gathered in zip(row_keys, column_keys):
        mask |= (local[:, None] == gathered[None, :]) & (local[:, None] != NO_KEY)  # [N_local, N_global]
    own = torch.arange(rows, device=mask.device) + offset
    mask[torch.arange(rows, device=mask.device), own] = False
    return mask


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    row_keys: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the (global) batch: loss = L_image->text + L_text->image.

    Args:
        image_embeds: L2-normalised image (or region) embeddings [N, D].
        text_embeds: L2-normalised text embeddings [N, D]; row i describes image row i.
        logit_scale: the temperature multiplier exp(t), a scalar tensor.
        row_keys: optional integer keys [N] per row (e.g. a hash of the normalised text, an id of the source
            image; `NO_KEY` for none). Two rows sharing a key describe the same thing: they are not negatives of
            each other, so their logits are left out of each other's softmax denominators (both directions).

    Returns:
        (loss, logits_per_image [N, N_global], logits_per_text [N, N_global]). In a distributed run the rows are
        this rank's and the columns the whole gathered batch (the logits are returned unmasked); the loss is this rank's
        summed row terms divided by the global row count, times the world size, so that its average over ranks
        (the DDP gradient average) is the mean over the concatenated batch.
    """
    _, world_size = _distributed_world()
    all_image, offset = gather_with_grad(image_embeds)
    all_text, _ = gather_with_grad(text_embeds)
    scale = logit_scale.float()
    logits_per_image = scale * image_embeds.float() @ all_text.float().t()  # [N, N_global]
    logits_per_text = scale * text_embeds.float() @ all_image.float().t()  # [N, N_global]
    loss_logits_image, loss_logits_text = logits_per_image, logits_per_text
    if row_keys:
        dropped = false_negative_mask(row_keys, [gather_keys(k) for k in row_keys], offset)  # [N, N_global]
        loss_logits_image = logits_per_image.masked_fill(dropped, float("-inf"))
        loss_logits_text = logits_per_text.masked_fill(dropped, float("-inf"))
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    terms = F.cross_entropy(loss_logits_image, targets, reduction="sum") + F.cross_entropy(
        loss_logits_text, targets, reduction="sum"
    )
    loss = terms * (world_size / all_image.shape[0])
    return loss, logits_per_image, logits_per_text


def caption_loss(
    logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the labelled tokens of the (global) batch.

    Args:
        logits: [N, L, V] language-model logits over the caption sequence.
        labels: [N, L] token ids to predict, `-100` where no loss is taken (prompt, visual tokens, padding).
            Position t predicts `labels[:, t + 1]` (the shift happens here, as in transformers' causal LMs).
        shift_labels: [N, L] labels already shifted (position t predicts `shift_labels[:, t]`), as transformers'
            causal LMs take them (e.g. from a sequence-parallel collator); used instead of `labels` when given.

    In a distributed run the token count is summed over ranks (every rank must call this) and each rank returns its
    summed token terms over the global count times the world size, as `contrastive_loss` does.
    """
    if shift_labels is not None:
        shift_logits = logits.float().reshape(-1, logits.shape[-1])  # [N*L, V]
        shift_labels = shift_labels.reshape(-1).to(logits.device)  # [N*L]
    else:
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [N*(L-1), V]
        shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # [N*(L-1)]
    _, world_size = _distributed_world()
    tokens = (shift_labels != IGNORE_INDEX).sum()
    if world_size > 1:
        tokens = tokens.clone()
        dist.all_reduce(tokens)
    summed = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    # No branch on the count (it would wait for the device): a batch without caption tokens sums to a zero that
    # still depends on the logits, which keeps DDP and autograd happy.
    return summed * (world_size / tokens.clamp(min=1).to(summed.dtype))
