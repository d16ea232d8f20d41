"""`MMGEMModelTester`: tiny configs and inputs for the common model tests, built like transformers' LLaVA tester.

Token ids: the vocabulary's last three rows are `[EMB]`, `[CAP]` and `<image>`; each caption sequence is
`<bos> <image>*K [CAP] tokens...` with K = `pool_grid_size ** 2` placeholders (as `MMGEMProcessor` writes it).
"""

from __future__ import annotations

import torch

from modeling_mmgem.configuration_mmgem import MMGEMConfig


class MMGEMModelTester:
    def __init__(
        self,
        parent,
        batch_size: int = 7,  # the mixin's eager/SDPA check runs 7 rows; fewer would be padded with rows without images
        seq_length: int = 12,
        vocab_size: int = 99,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        image_size: int = 16,
        patch_size: int = 4,
        pool_grid_size: int = 2,
        is_training: bool = True,
    ) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.image_size = image_size
        self.patch_size = patch_size
        self.pool_grid_size = pool_grid_size
        self.is_training = is_training
        self.num_image_tokens = pool_grid_size**2
        # Low ids, as LLaVA's tester: the mixin's resize check shrinks the vocabulary by 15 rows and clamps
        # `input_ids` into it, which must leave MM-GEM's control tokens in place.
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 0
        self.emb_token_id, self.cap_token_id, self.image_token_id = 3, 4, 5
        self.first_text_id = 6
        self.seq_length = seq_length  # <bos> <image>*K [CAP] + text tokens
        self.text_config = {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
        }
        self.vision_config = {
            "model_type": "clip_vision_model",
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "projection_dim": hidden_size,
        }

    def get_config(self) -> MMGEMConfig:
        return MMGEMConfig(
            vision_config=dict(self.vision_config),
            text_config=dict(self.text_config),
            pool_grid_size=self.pool_grid_size,
            projection_dim=16,
            emb_token_id=self.emb_token_id,
            cap_token_id=self.cap_token_id,
            image_token_id=self.image_token_id,
        )

    def prepare_config_and_inputs(self) -> tuple[MMGEMConfig, torch.Tensor]:
        pixel_values = torch.rand(self.batch_size, 3, self.image_size, self.image_size)
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self) -> tuple[MMGEMConfig, dict[str, torch.Tensor]]:
        config, pixel_values = self.prepare_config_and_inputs()
        text_length = self.seq_length - self.num_image_tokens - 2
        text = torch.randint(self.first_text_id, self.vocab_size, (self.batch_size, text_length))
        prompt = [self.bos_token_id] + [self.image_token_id] * self.num_image_tokens + [self.cap_token_id]
        input_ids = torch.cat([torch.tensor(prompt).expand(self.batch_size, -1), text], dim=1)
        attention_mask = torch.ones_like(input_ids)
        # The texts matched to the images for the contrastive loss: `<bos> text [EMB]`, so that a training step
        # reaches every weight (h1, h3 and the temperature too).
        text_input_ids = torch.cat(
            [
                torch.full((self.batch_size, 1), self.bos_token_id),
                # below the vocabulary the resize check shrinks to (it clamps only `input_ids`)
                torch.randint(self.first_text_id, self.vocab_size - 15, (self.batch_size, 5)),
                torch.full((self.batch_size, 1), self.emb_token_id),
            ],
            dim=1,
        )
        return config, {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "text_input_ids": text_input_ids,
            "text_attention_mask": torch.ones_like(text_input_ids),
        }
