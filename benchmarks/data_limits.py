"""Peak memory and time of the data readers on the hostile inputs of the hardening audit (issue 22, item 5).

    python -m benchmarks.data_limits                 # all cases, each in a fresh process
    python -m benchmarks.data_limits --cases tar     # one case

Each case runs in its own interpreter and reports its peak resident memory (`ru_maxrss`, the kernel's high-water
mark) above the interpreter's baseline after imports, and its wall time:

- `tar`: a `.tar.gz` shard (a few hundred kB) holding one 600 MB member between two good samples, read by the
  training stream with `--data-on-error skip`;
- `imagefolder`: an imagefolder of 40 PNGs of 2000 x 2000 pixels, opened as a streaming training source;
- `caption`: one training batch whose caption is 12 MB of text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "tar": """
import gzip, io, tarfile, warnings
from mmgem.data.formats import Shard, SourceOptions
from mmgem.data.formats.detect import open_source
from mmgem.data.sources import StreamingImageTextDataset
from PIL import Image
buffer = io.BytesIO(); Image.new("RGB", (32, 32), "red").save(buffer, format="PNG"); png = buffer.getvalue()
path = ROOT + "/00000.tar.gz"
with tarfile.open(path, "w:gz", compresslevel=1) as tar:
    def add(name, data=None, size=None, stream=None):
        info = tarfile.TarInfo(name); info.size = len(data) if data is not None else size
        tar.addfile(info, io.BytesIO(data) if data is not None else stream)
    class Zeros(io.RawIOBase):
        def readable(self): return True
        def readinto(self, view): view[:] = bytes(len(view)); return len(view)
    add("a.png", png); add("a.txt", b"good")
    add("b.png", size=600_000_000, stream=io.BufferedReader(Zeros(), 1 << 20)); add("b.txt", b"big")
    add("c.png", png); add("c.txt", b"good")
START()
source = open_source(path, "webdataset", SourceOptions(shuffle=False), "skip")
dataset = StreamingImageTextDataset([source], on_error="skip", epochs=1); dataset.shard = Shard()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    items = list(dataset)
STOP(samples=len(items), skipped=dataset.skipped, shard_bytes=os.path.getsize(path))
""",
    "imagefolder": """
import json, warnings, mmgem
print("code:", mmgem.__file__, file=sys.stderr)
import numpy as np
from PIL import Image
from mmgem.data.formats import Shard, SourceOptions
from mmgem.data.formats.detect import open_source
os.makedirs(ROOT + "/folder/images")
ramp = np.add.outer(np.arange(2000), np.arange(2000)).astype(np.uint8)
with open(ROOT + "/folder/metadata.jsonl", "w") as handle:
    for i in range(40):
        pixels = np.stack([ramp, ramp.T, (ramp + i).astype(np.uint8)], -1)
        Image.fromarray(pixels).save(ROOT + f"/folder/images/{i}.png")
        handle.write(json.dumps({"file_name": f"images/{i}.png", "caption": f"image {i}"}) + "\\n")
import datasets
START()
source = open_source(ROOT + "/folder", "imagefolder", SourceOptions(shuffle=False), "fail")
STOP(records=len(source))
""",
    "caption": """
from PIL import Image
from mmgem.build import tiny_mmgem
from mmgem.data.collator import MMGEMCollator
model, processor = tiny_mmgem()
caption = ("a red circle on a blue square " * 400_000)[:12_000_000]
START()
batch = MMGEMCollator(processor, stage=1, seed=0)([{"image": Image.new("RGB", (32, 32)), "caption": caption}])
STOP(tokens=int(batch["input_ids"].shape[1]))
""",
}

PRELUDE = """
import json, os, resource, sys, time
ROOT = sys.argv[1]
def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def START():
    global BASE, T0
    BASE, T0 = rss_mb(), time.perf_counter()
def STOP(**facts):
    seconds = round(time.perf_counter() - T0, 1)
    print(json.dumps({"peak_rss_above_baseline_mb": round(rss_mb() - BASE), "seconds": seconds, **facts}))
"""


def run_case(name: str, code_root: Path) -> dict:
    """Run one case in a fresh interpreter importing the code under `code_root`; its JSON report."""
    with tempfile.TemporaryDirectory(prefix=f"mmgem-{name}-") as scratch:
        env = {**os.environ, "PYTHONPATH": str(code_root)}
        # cwd: `python -c` puts the current folder first on sys.path, which must not shadow `code_root`.
        result = subprocess.run(
            [sys.executable, "-c", PRELUDE + CASES[name], scratch],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--code", default=str(REPO), help="the checkout whose code is measured (default: this one)")
    args = parser.parse_args(argv)
    for name in args.cases.split(","):
        print(json.dumps({"case": name, **run_case(name, Path(args.code))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
