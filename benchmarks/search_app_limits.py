"""Two costs the index and the app bound, measured on this checkout's code (or another checkout's, with --repo):

- the peak RSS of `mmgem app` when a 144-megapixel PNG (a few hundred kB of zeros) is sent to its /describe endpoint
  (the app reads uploads from their path with the model's loader, which refuses the image from its header);
- the time to read one shard hit (`shard.tar#key.png`) from a 10,000-sample shard, first hit and warm.

    python -m benchmarks.search_app_limits [--repo PATH] [--skip-app]

Numbers depend on the machine; the README of a change quotes the ones measured there.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def zero_png(path: Path, side: int = 12_000) -> Path:
    """A `side x side` RGB PNG of zeros, written row by row (never held decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + side * 3)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def app_peak_rss(repo: Path, workdir: Path) -> str:
    from gradio_client import Client, handle_file
    from PIL import Image

    code = f"import sys; sys.path.insert(0, {str(repo)!r}); sys.path.insert(0, {str(REPO)!r})\n" + (
        "from tests.search_helpers import readable_tiny_mmgem, save_model\n"
        f"save_model(*readable_tiny_mmgem(), __import__('pathlib').Path({str(workdir / 'model')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    bomb = zero_png(workdir / "bomb.png")
    small = workdir / "small.png"
    Image.new("RGB", (32, 32), "red").save(small)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ, PYTHONPATH=str(repo), GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "mmgem.cli", "app", "--model", str(workdir / "model"), "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "config", timeout=2)
                break
            except OSError:
                time.sleep(0.5)

        def peak_mb() -> int:
            with open(f"/proc/{process.pid}/status") as status:
                return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) // 1024

        client = Client(url, verbose=False)
        client.predict(handle_file(str(small)), "", api_name="/describe")  # warm: the model has run once
        before = peak_mb()
        try:
            client.predict(handle_file(str(bomb)), "", api_name="/describe")
            outcome = "accepted"
        except Exception as error:  # noqa: BLE001 - the page's error is the expected outcome
            outcome = "refused: " + str(error)[:90]
        time.sleep(1)
        after = peak_mb()
    finally:
        process.terminate()
        process.wait()
    return (
        f"app, {bomb.stat().st_size / 1e3:.0f} kB PNG of 144 MP: peak RSS {before} -> {after} MB "
        f"(+{after - before} MB); {outcome}"
    )


def shard_hit_ms(repo: Path, workdir: Path) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    data, shard = buffer.getvalue(), workdir / "10k.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(10_000):
            info = tarfile.TarInfo(f"./s{i:05d}.png")  # as `tar -C dir -cf x.tar .` names them
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code = (
        f"import sys, time; sys.path.insert(0, {str(repo)!r})\n"
        "from mmgem.search.sources import load_image\n"
        f"keys = [{str(shard)!r} + f'#s{{i:05d}}.png' for i in range(0, 10_000, 500)]\n"
        "for label in ('first', 'warm'):\n"
        "    start = time.perf_counter(); [load_image(k) for k in keys]\n"
        "    print(f'{label} {(time.perf_counter() - start) / len(keys) * 1000:.2f}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        return f"shard hits: failed ({result.stderr.strip().splitlines()[-1][:120]})"
    first, warm = (line.split()[1] for line in result.stdout.strip().splitlines()[-2:])
    return f"shard hits, 10,000-sample tar: {first} ms a hit over the first 20, then {warm} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.search_app_limits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code is measured")
    parser.add_argument("--skip-app", action="store_true", help="only the shard hits (no gradio needed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmgem-limits-") as workdir:
        print(shard_hit_ms(args.repo.resolve(), Path(workdir)))
        if not args.skip_app:
            print(app_peak_rss(args.repo.resolve(), Path(workdir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
