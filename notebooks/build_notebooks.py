"""Write notebooks/quickstart.ipynb and notebooks/lora_finetuning.ipynb from the cell sources below.

The notebooks are generated, so they stay reproducible and reviewable as plain Python: edit this file, then run

    python notebooks/build_notebooks.py          # rewrite both notebooks (outputs empty)
    python notebooks/build_notebooks.py --check  # exit 1 if a notebook differs from what this file writes

Both run top to bottom on CPU in about half a minute (`pytest --nbmake notebooks/`): with `MODEL_PATH = None` they
build a tiny MM-GEM and a small synthetic shapes dataset in the notebook itself; set `MODEL_PATH` to a folder or Hub
repo id of a real MM-GEM checkpoint to run the same cells on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------- shared
# The tiny stand-in for a real checkpoint: both notebooks fit it for a few seconds so that their outputs mean
# something. `{steps}` and `{records}` are filled per notebook.
TINY_MODEL_CELL = """\
if MODEL_PATH is None:
    torch.set_num_threads(1)  # the tiny model's matrices are too small to gain from threads (and busy CI cores)
    # A tiny random MM-GEM (hidden size 32, 2 layers, 32 px images) with a tokenizer trained on the captions,
    # fitted for a few seconds with the joint loss (contrastive + captioning, images and regions).
    from mmgem.build import tiny_mmgem
    from mmgem.data.collator import MMGEMCollator
    from mmgem.data.records import ImageCaptionDataset

    texts = [r.caption for r in train_records] + [region.caption for r in train_records for region in r.regions]
    model, processor = tiny_mmgem(texts=texts, initializer_range=0.2)  # a wider init lets the tiny model learn fast
    collate = MMGEMCollator(processor, stage=2, seed=0)
    items = list(ImageCaptionDataset({records}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range({steps}):
        batch = collate([items[i] for i in torch.randint(len(items), (16,)).tolist()])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"tiny model fitted for {steps} steps, last loss {{loss.item():.2f}}")
    model.save_pretrained(WORK / "tiny-mmgem")
    processor.save_pretrained(WORK / "tiny-mmgem")
    MODEL_PATH = str(WORK / "tiny-mmgem")"""

QUICKSTART_IMPORTS = """\
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor

from mmgem.data.records import load_jsonl_records
from mmgem.synthetic import generate_dataset

torch.manual_seed(0)
WORK = Path(tempfile.mkdtemp(prefix="mmgem-quickstart-"))"""

LORA_IMPORTS = """\
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments

from mmgem.data.collator import MMGEMCollator
from mmgem.data.records import ImageCaptionDataset, load_jsonl_records
from mmgem.evaluation.evaluate import evaluate_model, format_table
from mmgem.integrations.lora import apply_lora, count_parameters, load_lora_adapter
from mmgem.synthetic import generate_dataset

torch.manual_seed(0)
WORK = Path(tempfile.mkdtemp(prefix="mmgem-lora-"))"""


def _notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook from (kind, source) pairs, with stable cell ids (so rebuilding changes nothing) and no outputs."""
    notebook = new_notebook()
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for index, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell.id = f"cell-{index:02d}"
        notebook.cells.append(cell)
    return notebook


# ---------------------------------------------------------------------------------------------------------- quickstart
QUICKSTART = [
    (
        "md",
        """\
# MM-GEM quickstart

MM-GEM ([arXiv 2405.19333](https://arxiv.org/abs/2405.19333)) puts images, image regions and texts in one embedding
space **and** writes captions, with a single language model. This notebook loads a model folder with `AutoModel` /
`AutoProcessor` (remote code, `trust_remote_code=True`) and goes through what it does:

1. embed texts and images, rank them, draw a similarity heatmap;
2. zero-shot classification;
3. caption an image;
4. caption regions (boxes) and retrieve a region from a text, drawing the boxes;
5. the same model as a `sentence-transformers` model.

`MODEL_PATH = None` builds a tiny MM-GEM and fits it for a few seconds on synthetic shapes, so everything runs on a
CPU in about half a minute; its answers are those of a toy. Set `MODEL_PATH` to a folder or Hub repo id of a real
MM-GEM checkpoint (e.g. one written by `mmgem-convert`) to run the same cells on it.""",
    ),
    (
        "code",
        'MODEL_PATH = None  # e.g. "path/to/mmgem-folder" or "user/mmgem-repo"; None: a tiny model made here',
    ),
    ("code", QUICKSTART_IMPORTS),
    (
        "md",
        """\
## Data

The project's synthetic dataset: flat coloured shapes with exact captions ("a small red circle and a large blue
star") and a box and caption for every shape. It takes a second to generate.""",
    ),
    (
        "code",
        """\
data = generate_dataset(
    WORK / "shapes",
    num_train=256,
    num_val=16,
    num_test=32,
    max_objects=2,
    single_object_fraction=0.5,
    num_heldout_pairs=0,
    progress=False,
)
train_records = load_jsonl_records(data["train"])
test_records = load_jsonl_records(data["test"])
print(len(train_records), "training images;", test_records[0].caption)""",
    ),
    ("md", "## Model\n\nA tiny stand-in when `MODEL_PATH` is None, then the usual transformers loading."),
    ("code", TINY_MODEL_CELL.format(records="train_records", steps=200)),
    (
        "code",
        """\
model = AutoModel.from_pretrained(MODEL_PATH, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(MODEL_PATH, trust_remote_code=True)
print(type(model).__name__, "with", sum(p.numel() for p in model.parameters()), "parameters")""",
    ),
    (
        "code",
        """\
examples = test_records[:6]
images = [r.load_image() for r in examples]
captions = [r.caption for r in examples]

fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.6))
for i, (ax, image, caption) in enumerate(zip(axes, images, captions)):
    ax.imshow(image)
    ax.set_title(f"image {i}", fontsize=9)
    ax.set_xlabel(caption.replace(" and ", "\\nand "), fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """\
## 1. Embeddings, ranking, similarity heatmap

`get_text_features` embeds a text through the language model's hidden state at an appended `[EMB]` token;
`get_image_features` pools the vision tower's patch grid. Both return `.pooler_output`, not normalised (as CLIP):
normalise, then cosine similarity is a dot product.""",
    ),
    (
        "code",
        """\
with torch.no_grad():
    text_embeds = F.normalize(model.get_text_features(**processor(text=captions)).pooler_output, dim=-1)
    pixel_values = processor(images=images)["pixel_values"]
    image_embeds = F.normalize(model.get_image_features(pixel_values).pooler_output, dim=-1)
similarity = text_embeds @ image_embeds.T  # [texts, images]
print(text_embeds.shape, image_embeds.shape)

fig, ax = plt.subplots(figsize=(6, 4.5))
im = ax.imshow(similarity.numpy(), cmap="viridis")
ax.set_xticks(range(len(images)), [f"image {i}" for i in range(len(images))], rotation=45)
ax.set_yticks(range(len(captions)), captions, fontsize=7)
ax.set_title("cosine similarity: texts x images")
fig.colorbar(im)
plt.tight_layout()
plt.show()""",
    ),
    (
        "code",
        """\
query = captions[0]
order = similarity[0].argsort(descending=True)
print(f"images ranked for {query!r}:", [f"image {int(i)} ({similarity[0, i]:.2f})" for i in order])

order = similarity[:, 1].argsort(descending=True)
print("captions ranked for image 1:")
for i in order[:3]:
    print(f"  {similarity[i, 1]:.2f}  {captions[i]}")""",
    ),
    (
        "md",
        """\
## 2. Zero-shot classification

Embed one text per class ("a red circle", ...) and pick the most similar class for each image. The images here hold
one shape each; the model's learned temperature turns similarities into probabilities.""",
    ),
    (
        "code",
        """\
from mmgem.synthetic import load_labels, zero_shot_examples

classes = load_labels(data["root"])["classes"]
labelled = zero_shot_examples(test_records)[:8]
with torch.no_grad():
    class_inputs = processor(text=[f"a {c}" for c in classes])
    class_embeds = F.normalize(model.get_text_features(**class_inputs).pooler_output, dim=-1)
    pixel_values = processor(images=[r.load_image() for r, _ in labelled])["pixel_values"]
    embeds = F.normalize(model.get_image_features(pixel_values).pooler_output, dim=-1)
    probabilities = (model.logit_scale() * embeds @ class_embeds.T).softmax(dim=-1)
correct = 0
for (_, label), p in zip(labelled, probabilities):
    best = p.argsort(descending=True)[:3]
    correct += classes[int(best[0])] == label
    print(f"{label:>16} -> " + ", ".join(f"{classes[int(i)]} {p[i]:.2f}" for i in best))
print(f"top-1 accuracy {correct / len(labelled):.2f} over {len(classes)} classes")""",
    ),
    (
        "md",
        """\
## 3. Captioning

`generate` works as for any transformers model (greedy, beam search, sampling, KV cache). Without `input_ids`, the
model builds the prompt `<bos> <image>*K [CAP]` itself; `processor(images=...)` also returns it.
`processor.decode_captions` keeps the text after `[CAP]`.""",
    ),
    (
        "code",
        """\
with torch.no_grad():
    generated = model.generate(**processor(images=images), max_new_tokens=16, do_sample=False)
for i, (caption, reference) in enumerate(zip(processor.decode_captions(generated), captions)):
    print(f"image {i}: {caption!r}  (reference: {reference!r})")""",
    ),
    (
        "md",
        """\
## 4. Regions: caption a box, find the box that matches a text

Boxes are `[x0, y0, x1, y1]` in pixels of the original image; the processor maps them through its resize and crop.
The PoolAggregator pools each box (RoIAlign) from the same feature map: `generate` captions every region,
`get_image_features(..., boxes=...)` embeds every region in the same space as the texts.""",
    ),
    (
        "code",
        """\
record = next(r for r in test_records if len(r.regions) >= 2)
image = record.load_image()
boxes = [region.box for region in record.regions]

with torch.no_grad():
    inputs = processor(images=[image], boxes=[boxes])  # pixel_values, normalised boxes, one prompt per region
    region_captions = processor.decode_captions(model.generate(**inputs, max_new_tokens=16, do_sample=False))
    region_embeds = model.get_image_features(inputs["pixel_values"], boxes=inputs["boxes"]).pooler_output
    region_embeds = F.normalize(region_embeds, dim=-1)
    query = record.regions[-1].caption
    query_embed = F.normalize(model.get_text_features(**processor(text=[query])).pooler_output, dim=-1)
scores = (query_embed @ region_embeds.T)[0]
best = int(scores.argmax())
for region, caption, score in zip(record.regions, region_captions, scores):
    print(f"box {region.box}: generated {caption!r}, reference {region.caption!r}, score for query {score:.2f}")
print(f"query {query!r} -> box {best}")""",
    ),
    (
        "code",
        """\
from matplotlib.patches import Rectangle

fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(image)
for i, (box, caption) in enumerate(zip(boxes, region_captions)):
    x0, y0, x1, y1 = box
    colour = "red" if i == best else "black"
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
    label = dict(facecolor="white", alpha=0.7, pad=1, linewidth=0)
    ax.text(x0, y0 - 1, f"{i}: {caption}", color=colour, fontsize=8, va="bottom", bbox=label)
ax.set_title(f"query: {query!r} -> box {best} (red)", fontsize=9)
ax.axis("off")
plt.show()""",
    ),
    (
        "md",
        """\
## 5. sentence-transformers

Every MM-GEM folder is also a `sentence-transformers` model (its built-in multimodal `Transformer` module calls
`get_text_features` / `get_image_features`, then `Normalize`). Folders exported by `mmgem-convert` carry the files
already; `load_sentence_transformer` adds them to a plain `save_pretrained` folder. Strings that are image paths are
encoded as images. Regions do not fit sentence-transformers' inputs: `encode_regions` covers them.""",
    ),
    (
        "code",
        """\
from mmgem.integrations.sentence_transformers import encode_regions, load_sentence_transformer

st = load_sentence_transformer(MODEL_PATH)  # SentenceTransformer(MODEL_PATH, trust_remote_code=True)
st_texts = st.encode(captions, convert_to_tensor=True)
st_images = st.encode(images, batch_size=4, convert_to_tensor=True)
print("texts as above:", torch.allclose(st_texts, text_embeds, atol=1e-5))
print("images as above:", torch.allclose(st_images, image_embeds, atol=1e-5))
print(st.similarity(st.encode_query(["a large green star"]), st_images))
st_regions = encode_regions(st, [image], [boxes], convert_to_tensor=True)
print("regions:", torch.allclose(st_regions, region_embeds, atol=1e-5))""",
    ),
]

# ---------------------------------------------------------------------------------------------------------- LoRA
LORA = [
    (
        "md",
        """\
# LoRA fine-tuning of MM-GEM

Fine-tune an MM-GEM on a small image-caption set with PEFT LoRA and the Hugging Face `Trainer`, with the model's
joint loss (image-text contrastive + captioning):

1. retrieval and caption metrics of the base model;
2. `apply_lora`: LoRA on the language model's linear layers only (the vision attention shares their names and stays
   frozen), the projections h1/h2/h3 and the temperature trained and saved with the adapter, the `[EMB]` / `[CAP]`
   embedding rows trainable;
3. training with the `Trainer`, the loss curve;
4. the metrics again;
5. save the adapter, reload it onto a fresh base (every key checked), merge it, export the merged model with the
   conversion script (a folder that is a transformers **and** a sentence-transformers model).

`MODEL_PATH = None` builds a tiny MM-GEM, briefly fitted on part of the data, as the base, so that it all runs on a
CPU in under a minute. Set `MODEL_PATH` to a folder or Hub repo id of a real MM-GEM (and use a GPU) for the real
thing; the cells stay the same.""",
    ),
    (
        "code",
        """\
MODEL_PATH = None  # e.g. "path/to/mmgem-folder" or "user/mmgem-repo"; None: a tiny base made here
LORA_STEPS = 300""",
    ),
    ("code", LORA_IMPORTS),
    (
        "code",
        """\
data = generate_dataset(
    WORK / "shapes",
    num_train=256,
    num_val=64,
    num_test=8,
    max_objects=1,  # one shape per image: a task the tiny model learns in seconds
    single_object_fraction=1.0,
    num_heldout_pairs=0,
    progress=False,
)
train_records = load_jsonl_records(data["train"])
val_records = load_jsonl_records(data["val"])
print(len(train_records), "training and", len(val_records), "validation images, e.g.", train_records[0].caption)""",
    ),
    ("md", "## The base model\n\nA tiny stand-in when `MODEL_PATH` is None: fitted briefly on the first 64 images."),
    ("code", TINY_MODEL_CELL.format(records="train_records[:64]", steps=100)),
    (
        "code",
        """\
model = AutoModel.from_pretrained(MODEL_PATH, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(MODEL_PATH, trust_remote_code=True)
device = "cuda" if torch.cuda.is_available() else "cpu"
TASKS = ("retrieval", "captioning")
before = evaluate_model(model.to(device), processor, val_records, tasks=TASKS, max_new_tokens=24, progress=False)
print(format_table(before.metrics, "base model"))""",
    ),
    (
        "md",
        """\
## LoRA

`apply_lora(model, ...)` wraps the model with `mmgem_lora_config(model, ...)`; the config is a plain `LoraConfig`
(print it to see the target regex). `train_vision="lora"` or `"full"` would train the vision tower too;
`gradient_checkpointing=True` saves memory on big models.""",
    ),
    (
        "code",
        """\
peft_model = apply_lora(model, r=8, alpha=16, dropout=0.0)
config = peft_model.peft_config["default"]
print("LoRA target:", config.target_modules)
print("trained and saved in full:", config.modules_to_save)
print("trainable token rows:", config.trainable_token_indices)
print(count_parameters(peft_model))""",
    ),
    (
        "code",
        """\
args = TrainingArguments(
    output_dir=str(WORK / "lora-run"),
    per_device_train_batch_size=16,
    max_steps=LORA_STEPS,
    learning_rate=1e-2,
    warmup_steps=10,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    remove_unused_columns=False,  # the collator already builds exactly the model's inputs
    use_cpu=device == "cpu",
    disable_tqdm=True,
    seed=0,
)
trainer = Trainer(
    model=peft_model,
    args=args,
    train_dataset=ImageCaptionDataset(train_records),
    data_collator=MMGEMCollator(processor, stage=1),  # stage=2 adds the regions to both objectives
)
result = trainer.train()
print(f"{result.global_step} steps in {result.metrics['train_runtime']:.1f} s")""",
    ),
    (
        "code",
        """\
history = [entry for entry in trainer.state.log_history if "loss" in entry]
plt.figure(figsize=(5, 3))
plt.plot([entry["step"] for entry in history], [entry["loss"] for entry in history], marker=".")
plt.xlabel("step")
plt.ylabel("joint loss (contrastive + caption)")
plt.title("LoRA fine-tuning")
plt.grid(alpha=0.3)
plt.tight_layout()
plt.show()""",
    ),
    (
        "code",
        """\
after = evaluate_model(peft_model, processor, val_records, tasks=TASKS, max_new_tokens=24, progress=False)
print(f"{'metric':<22}{'before':>8}{'after':>8}")
for key in ("image_to_text/R@1", "text_to_image/R@1", "text_to_image/R@5", "caption/bleu4", "caption/cider"):
    print(f"{key:<22}{before.metrics[key]:>8.3f}{after.metrics[key]:>8.3f}")
for reference, generated in after.captions[:3]:
    print(f"{generated!r}  (reference: {reference!r})")""",
    ),
    (
        "md",
        """\
## Save, reload, merge, export

The adapter folder holds the LoRA weights, the projections, the temperature and the new token rows (a few hundred
kB for the tiny model). `load_lora_adapter` loads it onto a freshly loaded base and raises if any adapter key is
missing or unexpected (PEFT alone only warns). `peft_model.push_to_hub("me/my-mmgem-lora")` and
`load_lora_adapter("org/base", "me/my-mmgem-lora")` do the same through the Hub.""",
    ),
    (
        "code",
        """\
ADAPTER_DIR = WORK / "adapter"
peft_model.save_pretrained(ADAPTER_DIR)
for path in sorted(ADAPTER_DIR.iterdir()):
    print(f"{path.name:<28}{path.stat().st_size / 1024:8.1f} kB")

batch = processor(images=[r.load_image() for r in val_records[:4]], text=[r.caption for r in val_records[:4]])
batch = batch.to(device)


def embeddings(m):
    m.eval()
    with torch.no_grad():
        out = m(**batch)
    return torch.cat([out.text_embeds, out.image_embeds])


reloaded = load_lora_adapter(MODEL_PATH, ADAPTER_DIR).to(device)
print("reloaded == trained:", torch.allclose(embeddings(reloaded), embeddings(peft_model), atol=1e-5))
merged = reloaded.merge_and_unload()  # a plain MMGEMModel again
print(type(merged).__name__)
print("merged == trained:", torch.allclose(embeddings(merged), embeddings(peft_model), atol=1e-5))""",
    ),
    (
        "md",
        """\
The conversion script exports an adapter (merged on the way) or a merged model as one complete Hub folder (by
default checked by reloading it in a fresh process). The command line equivalent is
`mmgem-convert --from-checkpoint ADAPTER_DIR --output-dir exported [--push-to-hub me/my-mmgem]`.""",
    ),
    (
        "code",
        """\
from sentence_transformers import SentenceTransformer

from mmgem.conversion.convert_mmgem import export_checkpoint

# verify=False skips the reload in a fresh process (seconds of start-up); the next lines check the export here.
exported = export_checkpoint(ADAPTER_DIR, WORK / "exported", base_model=MODEL_PATH, verify=False)
print(sorted(p.name for p in exported.iterdir()))
final = AutoModel.from_pretrained(exported, trust_remote_code=True).to(device)
print("exported == trained:", torch.allclose(embeddings(final), embeddings(peft_model), atol=1e-5))
st = SentenceTransformer(str(exported), trust_remote_code=True, device=device)
texts = st.encode([r.caption for r in val_records[:3]])
images = st.encode([r.load_image() for r in val_records[:3]])
print(st.similarity(texts, images))""",
    ),
]


# ---------------------------------------------------------------------------------------------------------- main
NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "lora_finetuning.ipynb": LORA}


def render(cells: list[tuple[str, str]]) -> str:
    return nbformat.writes(_notebook(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = render(cells)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            temporary = path.with_name(f".{name}.tmp")
            temporary.write_text(text, encoding="utf-8")
            temporary.replace(path)  # atomic: a reader never sees half a notebook
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
