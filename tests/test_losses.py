"""The losses on designed inputs, against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_mmgem.loss_mmgem import caption_loss, contrastive_loss

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
