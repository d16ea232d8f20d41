"""Random components shaped like the paper's (a full CLIP ViT-L/14 at 224 px and TinyLlama-1.1B), saved in the real
formats, to measure the conversion's memory and time without downloading anything:

    python -m benchmarks.random_components --output-dir /tmp/mmgem-big
    python -m benchmarks.measure_peak_rss --vision-model /tmp/mmgem-big/clip-vit-large-patch14 \\
        --language-model /tmp/mmgem-big/tinyllama-1.1b --output-dir /tmp/mmgem-big/out

The CLIP folder is float32 and the TinyLlama folder bfloat16 (as the Hub releases are); the tokenizer is a word-level
one with TinyLlama's 32000 entries and no pad token, so the conversion resizes the embeddings to 32004 as it would for
the real model. About 1.7 GB + 2.2 GB of disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB_SIZE = 32000


def clip_vit_large_config() -> transformers.CLIPConfig:
    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    )
    text = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=768,
    )
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def tinyllama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tinyllama_sized_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """32000 entries (`<unk>`, `<s>`, `</s>`, then placeholder words), no pad token, like TinyLlama's."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB_SIZE)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    )


def _random(model_class: type, config: transformers.PretrainedConfig) -> torch.nn.Module:
    """A model with N(0, 0.02) weights, built on meta and filled in place (fast, one copy in memory)."""
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    clip_dir = args.output_dir / "clip-vit-large-patch14"
    llama_dir = args.output_dir / "tinyllama-1.1b"
    clip = _random(transformers.CLIPModel, clip_vit_large_config())
    clip.save_pretrained(clip_dir)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(clip_dir)
    del clip
    llama = _random(transformers.LlamaForCausalLM, tinyllama_config()).to(torch.bfloat16)
    llama.save_pretrained(llama_dir)
    tinyllama_sized_tokenizer().save_pretrained(llama_dir)
    print(f"Wrote {clip_dir} and {llama_dir}")


if __name__ == "__main__":
    main()
