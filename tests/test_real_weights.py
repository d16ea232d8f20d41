"""The real-weights tier: a fresh MM-GEM composed by `mmgem-convert` from a REAL pretrained LLM (SmolLM2-135M-Instruct,
from the package registry: see tests/real_weights.py) and a small random CLIP vision tower, checked as a user would
check it in a process where mmgem is not importable.

Both embedding layouts: the LLM as released (tied input/output embeddings) and the same weights untied. The composed
folders are shared by the whole session; the first run downloads ~93 MB with pip and caches the dequantised model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.outside import REPO_ROOT, run_cli, run_outside
from tests.real_weights import smollm2_folders

pytestmark = pytest.mark.slow
LAYOUTS = ["tied", "untied"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.fixture(scope="session")
def real_sources(tmp_path_factory) -> dict[str, Path]:
    """The SmolLM2 folders (tied, untied) and a small random CLIP vision tower with its image processor."""
    folders = smollm2_folders()
    clip = tmp_path_factory.mktemp("real-sources") / "clip-vision"
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    transformers.CLIPVisionModel(config).save_pretrained(clip)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(clip)
    return {**folders, "vision": clip}


@pytest.fixture(scope="session")
def composed(real_sources, tmp_path_factory) -> dict[str, Path]:
    """`mmgem-convert` of each layout, as a user runs it (with its fresh-process reload check)."""
    root = tmp_path_factory.mktemp("real-composed")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    folders = {}
    for layout in LAYOUTS:
        folders[layout] = root / f"mmgem-smollm2-{layout}"
        args = ["--vision-model", str(real_sources["vision"]), "--language-model", str(real_sources[layout])]
        args += ["--output-dir", str(folders[layout]), "--pool-grid-size", "2", "--projection-dim", "64"]
        result = subprocess.run(
            [sys.executable, "-m", "mmgem.conversion.convert_mmgem", *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert "Reload check passed" in result.stderr
    return folders


USER_CHECKS = """
import json, tempfile
import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

folder, source, prompts, tied = {folder!r}, {source!r}, {prompts!r}, {tied!r}
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
source_lm = AutoModelForCausalLM.from_pretrained(source).eval()
source_tokenizer = AutoTokenizer.from_pretrained(source)
vocab = source_lm.config.vocab_size
tokenizer = processor.tokenizer

# 1. The composed LM continues texts exactly as the source LLM (greedy), from the source tokenizer's ids.
for prompt in prompts:
    ids = source_tokenizer(prompt, return_tensors="pt").input_ids
    assert tokenizer(prompt, return_tensors="pt").input_ids.tolist() == ids.tolist(), prompt
    with torch.no_grad():
        expected = source_lm.generate(ids, max_new_tokens=16, do_sample=False)
        got = model.language_model.generate(ids, max_new_tokens=16, do_sample=False)
    assert got.tolist() == expected.tolist(), (prompt, source_tokenizer.decode(got[0]), expected.tolist())

# 2. The new rows ([EMB], [CAP], <image>; the pad is the eos here) start inside the vocabulary's distribution,
#    input and output embeddings alike; the original rows are the source's, bit for bit.
inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
assert (inputs.data_ptr() == outputs.data_ptr()) == tied
assert inputs.shape[0] == vocab + 3 and outputs.shape[0] == vocab + 3
for new, old, name in ((inputs, source_lm.get_input_embeddings().weight, "input"),
                       (outputs, source_lm.get_output_embeddings().weight, "output")):
    assert torch.equal(new[:vocab], old), name
    norms = old.norm(dim=-1)
    low, high = norms.mean() - 3 * norms.std(), norms.mean() + 3 * norms.std()
    new_norms = new[vocab:].norm(dim=-1)
    assert ((new_norms > low) & (new_norms < high)).all(), (name, new_norms, low, high)

# 3. Caption labels end with a learnable eos although this tokenizer pads with its eos.
assert tokenizer.pad_token_id == tokenizer.eos_token_id
images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (40 + i, 50, 3), dtype=np.uint8)) for i in range(2)]
batch = processor(images=images, text=["a cat", "a much longer caption of a dog on a red sofa"])
for row in batch["labels"]:
    assert row[row != -100][-1].item() == tokenizer.eos_token_id, row

# 4. Unicode, emoji and texts of hundreds of tokens embed the same alone and in a batch.
texts = ["héllo wörld — ünïcode ✓ “quotes”", "emoji 🐱🚀👍🏽 and 中文 and العربية", "short",
         " ".join(f"word{{i}} and more, with punctuation!" for i in range(60))]
encoded = processor(text=texts)
assert encoded["input_ids"].shape[1] > 300
with torch.no_grad():
    together = model.get_text_features(**encoded).pooler_output
    alone = torch.cat([model.get_text_features(**processor(text=[t])).pooler_output for t in texts])
    image_embeds = model.get_image_features(**processor(images=images)).pooler_output
torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)

# 5. Everything survives save / reload.
with tempfile.TemporaryDirectory() as copy:
    model.save_pretrained(copy)
    processor.save_pretrained(copy)
    again = AutoModel.from_pretrained(copy, trust_remote_code=True).eval()
    again_processor = AutoProcessor.from_pretrained(copy, trust_remote_code=True)
    assert torch.equal(again.get_input_embeddings().weight, inputs)
    assert torch.equal(again.get_output_embeddings().weight, outputs)
    with torch.no_grad():
        assert torch.equal(again.get_text_features(**again_processor(text=texts)).pooler_output, together)
        assert torch.equal(again.get_image_features(**again_processor(images=images)).pooler_output, image_embeds)
print("OK")
"""


@pytest.mark.timeout(1500)  # includes the session fixtures: two conversions (~1 min CPU each)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fresh_conversion_of_a_real_llm(composed, real_sources, layout, tmp_path):
    script = USER_CHECKS.format(
        folder=str(composed[layout]), source=str(real_sources[layout]), prompts=PROMPTS, tied=layout == "tied"
    )
    run_outside(script, tmp_path, timeout=1200)


LORA_CHECKS = """
import torch
from peft import AutoPeftModel
from transformers import AutoModel, AutoProcessor

base, merged_folder, adapter = {base!r}, {merged!r}, {adapter!r}
texts = ["a red circle", "two blue squares on the left"]
processor = AutoProcessor.from_pretrained(merged_folder, trust_remote_code=True)
merged = AutoModel.from_pretrained(merged_folder, trust_remote_code=True).eval()
original = AutoModel.from_pretrained(base, trust_remote_code=True).eval()
emb = merged.config.emb_token_id
# LoRA trained the language model and the new [EMB] row; the vision tower stayed frozen.
changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
assert any(n.startswith("language_model.model.layers") for n in changed), changed
assert not any(n.startswith("vision_model") for n in changed), changed
assert not torch.equal(merged.get_input_embeddings().weight[emb], original.get_input_embeddings().weight[emb])
# The adapter alone, loaded from another directory, gives the merged model's embeddings.
peft_model = AutoPeftModel.from_pretrained(adapter, trust_remote_code=True).eval()
with torch.no_grad():
    expected = merged.get_text_features(**processor(text=texts)).pooler_output
    got = peft_model.get_text_features(**processor(text=texts)).pooler_output
torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
print("OK")
"""


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    from mmgem.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("real-data") / "shapes"
    return generate_dataset(folder, 8, 2, 2, image_size=32, seed=0, progress=False)["train"]


@pytest.mark.timeout(1500)  # includes the session fixtures: two conversions (~1 min CPU each)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_training_round_trip_on_a_real_llm(composed, shapes, layout, tmp_path):
    """`mmgem train --lora` on the composed model for a few steps (relative --model path, as typed in a shell); the
    merged model and the adapter (loaded by PEFT's Auto class from another directory) agree."""
    work = composed[layout].parent
    output = tmp_path / "lora-run"
    result = run_cli(
        "train",
        "--model",
        composed[layout].name,
        "--data",
        str(shapes),
        "--output-dir",
        str(output),
        "--lora",
        "--lora-r",
        "4",
        "--max-steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
        cwd=work,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = json.loads((output / "training_log.json").read_text())
    losses = [row["loss"] for row in log if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    script = LORA_CHECKS.format(base=str(composed[layout]), merged=str(output), adapter=str(output / "lora_adapter"))
    run_outside(script, tmp_path, timeout=1200)
