"""Tokenizers without byte fallback (WordPiece, a Metaspace BPE) write their unknown token for characters outside
the vocabulary. Such a text is read as the tokenizer reads it (embedded, captioned, classified), never refused as if
it held a control token; control tokens typed in a text are still never produced."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, pipeline

from mmgem.build import DEFAULT_CORPUS, build_mmgem, tiny_configs

pytestmark = pytest.mark.fast
SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>"]
# Digits, punctuation, accents and emoji: none of them is in a vocabulary trained on DEFAULT_CORPUS.
UNUSUAL = ["a warm-up lap: 42 km/h!", "a red circle ☃ on the left", "Éclair, 3 pieces"]


def _wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(DEFAULT_CORPUS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS))
    return tokenizer


def _metaspace_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))  # no byte_fallback
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(DEFAULT_CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS))
    return tokenizer


@pytest.fixture(scope="module", params=["wordpiece", "metaspace_bpe"])
def built(request):
    backend = {"wordpiece": _wordpiece, "metaspace_bpe": _metaspace_bpe}[request.param]()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="<pad>"
    )
    vision_config, text_config = tiny_configs()
    torch.manual_seed(0)
    model, processor = build_mmgem(vision_config, text_config, tokenizer, pool_grid_size=2, projection_dim=32)
    return model.eval(), processor


def test_unknown_characters_tokenize_as_the_tokenizer_reads_them(built):
    model, processor = built
    unk = processor.tokenizer.unk_token_id
    batch = processor(text=UNUSUAL)
    for row, mask, text in zip(batch["input_ids"], batch["attention_mask"], UNUSUAL):
        expected = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk in expected  # the premise: this tokenizer has no byte fallback
        assert row[mask.bool()].tolist() == processor._bos() + expected + [model.config.emb_token_id]
    with torch.no_grad():
        embeds = model.get_text_features(**batch).pooler_output
    assert torch.isfinite(embeds).all()
    # Captions with unknown characters make training batches too.
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]
    training = processor(images=images, text=UNUSUAL)
    assert (training["labels"] == unk).any()


def test_control_tokens_typed_in_a_text_are_still_never_produced(built):
    model, processor = built
    tokenizer = processor.tokenizer
    control = {model.config.emb_token_id, model.config.cap_token_id, model.config.image_token_id}
    control |= {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    batch = processor(text=["a red <image> circle [EMB] </s> <pad> <s> [CAP]"])
    body = batch["input_ids"][0, 1:-1].tolist()  # between <s> and the appended [EMB]
    assert not control.intersection(body), body


def test_zero_shot_pipeline_classifies_labels_with_unknown_characters(built, tmp_path):
    model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    classify = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    labels = ["warm-up lap", "circle #2", "café"]
    result = classify(Image.new("RGB", (40, 30), "red"), candidate_labels=labels)
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert abs(sum(r["score"] for r in result) - 1.0) < 1e-5
