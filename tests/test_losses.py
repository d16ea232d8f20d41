"""The losses on designed inputs, against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_mmgem.loss_mmgem import (
    NO_KEY,
    caption_loss,
    contrastive_loss,
    false_negative_mask,
    pixel_row_keys,
    token_row_keys,
)

pytestmark = pytest.mark.fast


def _normalised(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_infonce_matches_a_hand_computation():
    images, texts = _normalised(4, seed=0), _normalised(4, seed=1)
    loss, per_image, per_text = contrastive_loss(images, texts, torch.tensor(10.0))
    logits = 10.0 * images @ texts.t()
    expected = -(logits.log_softmax(1).diag().mean() + logits.t().log_softmax(1).diag().mean())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(per_image, logits)
    torch.testing.assert_close(per_text, logits.t())


def test_infonce_rewards_matching_pairs():
    images = _normalised(6, seed=2)
    aligned = contrastive_loss(images, images, torch.tensor(20.0))[0]
    shuffled = contrastive_loss(images, images[[1, 2, 3, 4, 5, 0]], torch.tensor(20.0))[0]
    assert aligned < 0.1 < shuffled


def test_identical_texts_need_no_special_targets():
    # Two images captioned alike: their text rows are equal, so plain InfoNCE already splits the target evenly
    # between them (the soft-target loss that treats them as positives of each other is the same number).
    images = _normalised(3, seed=4)
    texts = images.clone()
    texts[1] = texts[0]
    logits = 50.0 * images @ texts.t()
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = -(soft * logits.log_softmax(1)).sum(1).mean() - (soft * logits.t().log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(contrastive_loss(images, texts, torch.tensor(50.0))[0], expected)


def test_caption_loss_shifts_and_ignores_unlabelled_positions():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4]])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(caption_loss(logits, labels), expected)
    no_labels = caption_loss(logits.requires_grad_(), torch.full_like(labels, -100))
    assert no_labels == 0 and no_labels.requires_grad  # still part of the graph (DDP needs every rank to backprop)


def test_rows_sharing_a_key_leave_each_other_out_of_the_softmax():
    # Rows 0 and 2 have the same text; rows 1 and 3 are the same image. Row 4 shares nothing.
    images, texts = _normalised(5, seed=5), _normalised(5, seed=6)
    text_keys = torch.tensor([7, 8, 7, 9, 10])
    image_keys = torch.tensor([1, 2, 3, 2, NO_KEY])
    loss, per_image, per_text = contrastive_loss(images, texts, torch.tensor(10.0), [text_keys, image_keys])
    logits = 10.0 * images @ texts.t()
    torch.testing.assert_close(per_image, logits)  # the returned logits are the similarities, unmasked
    # Hand computation: row i's softmax runs over its own column and the columns that are not the same thing.
    kept = {0: [0, 1, 3, 4], 1: [0, 1, 2, 4], 2: [1, 2, 3, 4], 3: [0, 2, 3, 4], 4: [0, 1, 2, 3, 4]}
    expected = 0.0
    for direction in (logits, logits.t()):
        for row, columns in kept.items():
            expected -= direction[row, row] - torch.logsumexp(direction[row, columns], dim=0)
    torch.testing.assert_close(loss, expected / 5)
    unmasked = contrastive_loss(images, texts, torch.tensor(10.0))[0]
    none_shared = contrastive_loss(images, texts, torch.tensor(10.0), [torch.arange(5), torch.full((5,), NO_KEY)])[0]
    torch.testing.assert_close(none_shared, unmasked)
    assert loss < unmasked


def test_false_negative_mask_across_global_columns():
    # This rank holds global rows 3 and 4 of 6; its first row shares a text with global row 0 and row 5.
    mask = false_negative_mask([torch.tensor([5, 6])], [torch.tensor([5, 1, 2, 5, 6, 5])], offset=3)
    assert mask.tolist() == [[True, False, False, False, False, True], [False] * 6]


def test_row_keys_from_tokens_and_pixels():
    ids = torch.tensor([[1, 5, 6, 2], [0, 1, 5, 6], [1, 5, 7, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0]])
    keys = token_row_keys(ids, mask)  # rows 0 and 1 are the same text, padded on different sides
    assert keys[0] == keys[1] != keys[2] and (keys >= 0).all()
    pixels = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels[2] = pixels[0]
    keys = pixel_row_keys(pixels)
    assert keys[0] == keys[2] != keys[1]
    pixels[2, 0, 0, 0] += 1e-3
    assert pixel_row_keys(pixels)[2] != keys[0]


def test_caption_loss_is_a_token_mean_over_the_batch():
    # Rows with more caption tokens weigh more: the mean is over tokens, not over rows.
    logits = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, -100, 3, -100]])
    terms = F.cross_entropy(logits[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(caption_loss(logits, labels), terms[labels[:, 1:].reshape(-1) != -100].sum() / 5)


def test_forward_leaves_repeated_captions_and_images_out_of_the_softmax():
    from mmgem.build import tiny_mmgem

    from .conftest import random_images

    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    images = random_images(4, sizes=((32, 32),))
    images[3] = images[0]  # the same picture twice
    batch = dict(processor(images=images, text=["a red circle", "a blue star", "a red circle", "a green square"]))
    output = model.train()(**batch)
    keys = [
        token_row_keys(batch["text_input_ids"], batch["text_attention_mask"]),
        pixel_row_keys(batch["pixel_values"]),
    ]
    assert keys[0][0] == keys[0][2] and keys[1][0] == keys[1][3]
    expected = contrastive_loss(output.image_embeds, output.text_embeds, model.logit_scale(), keys)[0]
    torch.testing.assert_close(output.loss_contrastive, expected)
    # Explicit keys win over the derived ones; with the option off every other row is a negative.
    given = model(**batch, text_keys=torch.arange(4), image_keys=torch.arange(4)).loss_contrastive
    model.config.mask_false_negatives = False
    plain = model(**batch).loss_contrastive
    torch.testing.assert_close(given, plain)
    assert expected < plain
