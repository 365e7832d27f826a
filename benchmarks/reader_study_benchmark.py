"""What the reader study costs: creating a large study, and serving 1024 px images to many readers at once.

    python benchmarks/reader_study_benchmark.py                       # 2,000 images at 1024 px, 10 readers, 60 s

1. `create`: `--num_images` images (half real, half synthetic) at `--size` px, from 256 px phantoms stored at
   `--size` (made before the clock starts), written as a study with one reader.
2. `serve` in its own process on 127.0.0.1: the seconds from its launch to its first answered page (goal: 2 s); then
   `--readers` concurrent clients in this process, each reading as a reader does (its page, its image, its answer) for
   `--seconds` at most and `--max_views` image views each: image views per second and their latency (median, p95), the
   page and the answer's too. The clients share the machine's cores with the server, so the figures are a floor for a
   server on its own machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.data.phantom import phantom_dataset  # noqa: E402
from lunggen_diffusers.reader_study.study import create_study  # noqa: E402
from lunggen_diffusers.utils import markdown_table  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

REPO = Path(__file__).resolve().parents[1]


def make_sources(root: Path, count: int, size: int) -> tuple[Path, Path]:
    """Two folders of `count` phantoms each, at `size` px (drawn at 256 px and enlarged)."""
    folders = root / "real", root / "synthetic"
    for seed, folder in enumerate(folders):
        folder.mkdir()
        for i, row in enumerate(phantom_dataset(count, 256, seed=seed, finding_prob=0.2)):
            row["image"].convert("L").resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.png")
    return folders


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load(port: int, tokens: list[str], seconds: float, max_views: int) -> dict:
    """Each token read by its own thread: page, image, answer, until `seconds` or `max_views`."""
    base = f"http://127.0.0.1:{port}"
    timings = {"page": [], "image": [], "answer": []}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def timed(kind, request):
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
        with lock:
            timings[kind].append(time.perf_counter() - start)
        return body

    def reader(token):
        for _ in range(max_views):
            if time.perf_counter() > deadline:
                return
            page = timed("page", f"{base}/r/{token}").decode()
            if "/image/" not in page:
                return
            image_id = page.split("/image/")[1][:32]
            position = int(page.split('name="position" value="')[1].split('"')[0])
            timed("image", f"{base}/r/{token}/image/{image_id}")
            answer = {"position": position, "call": "real", "confidence": 3, "quality": 3, "findings": [],
                      "comment": ""}
            timed("answer", urllib.request.Request(f"{base}/r/{token}/answer", data=json.dumps(answer).encode(),
                                                   headers={"Content-Type": "application/json"}, method="POST"))

    start = time.perf_counter()
    threads = [threading.Thread(target=reader, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "image_views": len(timings["image"]),
            "image_views_per_s": len(timings["image"]) / elapsed,
            **{f"{k}_ms": {"median": 1000 * percentile(v, 50), "p95": 1000 * percentile(v, 95)}
               for k, v in timings.items()}}


def first_answer(port: int, token: str, start: float) -> float:
    """Seconds from `start` (the server process's launch) to its first answered page, polled every 10 ms."""
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/r/{token}", timeout=5) as response:
                response.read()
            return time.perf_counter() - start
        except OSError:
            if time.perf_counter() - start > 60:
                raise
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max_views", type=int, default=200, help="image views per reader at most")
    parser.add_argument("--output", default="benchmarks/results/reader_study.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        real, synthetic = make_sources(root, args.num_images // 2 + 8, args.size)
        names = [f"reader{k}" for k in range(args.readers)]
        start = time.perf_counter()
        made = create_study(root / "study", str(real), [str(synthetic)], args.num_images, names, seed=0)
        create_s = time.perf_counter() - start
        print(f"created {args.num_images} images at {made['size']} px in {create_s:.1f} s", flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "lunggen_diffusers.reader_study", "serve", str(root / "study"),
                                   "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL)
        try:
            first_answer_s = first_answer(port, made["readers"][names[0]], start)
            print(f"serve answered its first request {first_answer_s:.2f} s after its start", flush=True)
            served = load(port, [made["readers"][n] for n in names], args.seconds, args.max_views)
        finally:
            server.kill()
    result = {"args": vars(args), "create_s": create_s, "serve_first_answer_s": first_answer_s, **served}
    table = markdown_table(
        ["what", "figure"],
        [[f"create, {args.num_images} images at {args.size} px", f"{create_s:.1f} s"],
         ["serve: its first page answered, from the process's start (goal: 2 s)", f"{first_answer_s:.2f} s"],
         [f"{args.readers} readers at once: image views per second", f"{served['image_views_per_s']:.1f}"]]
        + [[f"{kind} latency, median / p95", "{median:.0f} / {p95:.0f} ms".format(**served[f"{kind}_ms"])]
           for kind in ("image", "page", "answer")])
    finish(result, args.output, table)


if __name__ == "__main__":
    main()
