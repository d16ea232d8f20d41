"""Reload an exported MM-GEM folder in a fresh process, as its users will, and compare it with the converter's
in-memory model.

    python path/to/mmgem/conversion/verify_export.py FOLDER REFERENCES.pt

The conversion runs this file as a script (not as part of the mmgem package) so that the check sees only what the
folder itself provides: it imports torch, transformers, sentence-transformers and PIL, never `modeling_mmgem`, and
loads the model through the folder's remote code (`trust_remote_code=True`) with AutoModel, AutoProcessor and
SentenceTransformer. It prints one JSON line of results and exits non-zero with a message on the first failure.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

PARENT_PID_ENV = "MMGEM_VERIFY_PARENT_PID"


def exit_with_parent(poll_seconds: float = 0.2) -> None:
    """Exit as soon as the conversion that started this check is gone, even when it was SIGKILLed (which no
    handler sees): a watcher thread compares the parent's id with the one the conversion passed in."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return

    def watch() -> None:
        while os.getppid() == int(expected):
            time.sleep(poll_seconds)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


exit_with_parent()  # before the heavy imports below, which alone take seconds

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402


class ExportCheckError(AssertionError):
    pass


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> float:
    actual, expected = actual.float(), expected.float()
    if actual.shape != expected.shape:
        raise ExportCheckError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    difference = (actual - expected).abs().max().item() if actual.numel() else 0.0
    if not torch.allclose(actual, expected, atol=tolerance, rtol=tolerance):
        raise ExportCheckError(f"{name}: max difference {difference:.3g} exceeds {tolerance:g}")
    return difference


def check_model(folder: str, refs: dict, results: dict) -> None:
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    problems = {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if problems:
        raise ExportCheckError(f"AutoModel reload reports {problems}")
    if not type(model).__module__.startswith("transformers_modules"):
        raise ExportCheckError(f"AutoModel used {type(model).__module__}, not the folder's remote code")
    model.eval()
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    results["class"] = type(model).__name__
    results["dtype"] = str(next(model.parameters()).dtype)

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.fromarray(refs["image"].numpy())
    pixel_values = processor(images=[image])["pixel_values"]
    _close("processor pixel_values", pixel_values, refs["pixel_values"], 1e-6)
    text = processor(text=[refs["text"]])
    if not torch.equal(text["input_ids"], refs["text_input_ids"]):
        raise ExportCheckError("processor text ids differ from the converter's processor")

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        results["vision_max_diff"] = _close("vision tower outputs", hidden, refs["vision_hidden"], tolerance)
        logits = model.language_model(input_ids=refs["lm_input_ids"], use_cache=False).logits
        logits = logits[..., : refs["vocab_size"]]
        results["lm_max_diff"] = _close("text-only LM logits", logits, refs["lm_logits"], tolerance)
        image_embeds = model.get_image_features(pixel_values.to(dtype)).pooler_output
        _close("image embeddings", image_embeds, refs["image_embeds"], tolerance)
        text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"]).pooler_output
        _close("text embeddings", text_embeds, refs["text_embeds"], tolerance)
        caption_prompt = processor(images=[image])
        generated = model.generate(**caption_prompt, max_new_tokens=2, do_sample=False)
    results["generate_shape"] = list(generated.shape)


def check_sentence_transformers(folder: str, refs: dict, results: dict) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    tolerance = 1e-4 if refs["dtype"] == "torch.float32" else 2e-2
    image = Image.fromarray(refs["image"].numpy())
    text_embedding = model.encode([refs["text"]], convert_to_tensor=True)
    image_embedding = model.encode([image], convert_to_tensor=True)
    _close(
        "SentenceTransformer text embedding",
        text_embedding,
        F.normalize(refs["text_embeds"].float(), dim=-1),
        tolerance,
    )
    _close(
        "SentenceTransformer image embedding",
        image_embedding,
        F.normalize(refs["image_embeds"].float(), dim=-1),
        tolerance,
    )
    results["sentence_transformers_dim"] = int(text_embedding.shape[-1])


def peak_rss_gib() -> float | None:
    """This process's peak resident memory (VmHWM, Linux), or None where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024**2, 2)  # kB -> GiB
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    folder, references = argv if argv is not None else sys.argv[1:]
    refs = torch.load(references, weights_only=True)
    results: dict = {"folder": folder}
    try:
        check_model(folder, refs, results)
        check_sentence_transformers(folder, refs, results)
    except ExportCheckError as error:
        print(f"EXPORT CHECK FAILED: {error}", file=sys.stderr)
        return 1
    results["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
