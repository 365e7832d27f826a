"""Generation and evaluation under the real launcher, 2 CPU processes (gloo), against one process in this one."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.data.phantom import phantom_dataset
from lunggen_diffusers.evaluation.cli import main as evaluate_main
from lunggen_diffusers.evaluation.run import EvaluationArguments, run_evaluation
from lunggen_diffusers.generation import output_folder
from lunggen_diffusers.generation.output_folder import save_images
from lunggen_diffusers.generation.sampling import load_pipeline

from fixtures import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, BATCH = 7, 2  # 4 batches: rank 0 makes images 0-3, rank 1 images 4-6

# Runs a module's command line as `python -m` would, recording every file this process puts in place (all of the
# project's writes go through utils.atomic_path, hence os.replace); KILL_AT=n kills rank 1 at its n-th PNG, with the
# image written to its temporary but not yet renamed.
WORKER = """
import json, os, runpy, signal, sys
from pathlib import Path
report, module, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank, kill_at, placed, replace = os.environ["RANK"], int(os.environ.get("KILL_AT", "0")), [], os.replace
def spy(src, dst):
    name = Path(dst).name
    if rank == "1" and name.endswith(".png") and len([n for n in placed if n.endswith(".png")]) + 1 == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
    placed.append(name)
os.replace = spy
sys.argv = [module, *argv]
runpy.run_module(module, run_name="__main__")
Path(report, "rank" + rank + ".json").write_text(json.dumps(placed))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def launch(tmp_path, module, *argv, **env):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", "0", str(tmp_path / "worker.py"), str(tmp_path), module, *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )


def placed(tmp_path):
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}  # hidden files too


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A conditional model, so each image's drawn labels are part of what must not depend on the process count."""
    path = tmp_path_factory.mktemp("models") / "tiny-cond"
    tiny_pipeline().save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process") / "synth"
    save_images(load_pipeline(model_dir, device="cpu")[0], str(out), NUM_IMAGES, seed=3, num_inference_steps=2,
                batch_size=BATCH, labels_from="train", model="tiny-cond", progress=False)
    return out


def _generate_args(model_dir, out):
    return ["--model", model_dir, "--output_dir", str(out), "--num_images", str(NUM_IMAGES), "--seed", "3",
            "--num_inference_steps", "2", "--batch_size", str(BATCH), "--labels_from", "train", "--cpu_threads", "1"]


def test_two_processes_write_the_same_files_as_one_and_only_the_main_writes_shared_ones(model_dir, reference,
                                                                                       tmp_path):
    out = tmp_path / "synth"
    proc = launch(tmp_path, "lunggen_diffusers.generate", *_generate_args(model_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Byte for byte, PNGs (pixels and text chunks, labels among them) and manifest: each batch holds the same
    # images as in one process, computed by the same kernels on the same CPU at the same threads per process (the
    # reference runs at one thread, and so does each launched process: --cpu_threads 1), so no tolerance is needed.
    # At other thread counts oneDNN cuts its reductions differently and a pixel may move by one grey level.
    assert files(out) == files(reference)
    with open(out / "manifest.csv", newline="") as f:
        assert {(row["device"], row["cpu_threads"]) for row in csv.DictReader(f)} == {("cpu", "1")}
    main, other = placed(tmp_path)
    assert sorted(main) == ["grid.png", "image_000000.png", "image_000001.png", "image_000002.png",
                            "image_000003.png", "manifest.csv"]
    assert sorted(other) == ["image_000004.png", "image_000005.png", "image_000006.png"]
    assert proc.stdout.count("images in") == 1


def test_a_killed_process_then_a_rerun_makes_only_the_missing_images(model_dir, reference, tmp_path, monkeypatch):
    out = tmp_path / "synth"
    proc = launch(tmp_path, "lunggen_diffusers.generate", *_generate_args(model_dir, out), KILL_AT="2")
    assert proc.returncode != 0
    kept = {p.name for p in out.glob("image_*.png")}
    # Rank 1 was killed with image 5 in its temporary: image 4 is complete, 5 never reached its name.
    assert "image_000004.png" in kept and "image_000005.png" not in kept and list(out.glob(".image_000005.*"))
    assert not (out / "manifest.csv").exists()

    made = []
    batches = output_folder.iter_batches

    def spy(pipe, indices, *args, **kwargs):
        made.extend(indices)
        return batches(pipe, indices, *args, **kwargs)

    monkeypatch.setattr(output_folder, "iter_batches", spy)
    save_images(load_pipeline(model_dir, device="cpu")[0], str(out), NUM_IMAGES, seed=3, num_inference_steps=2,
                batch_size=BATCH, labels_from="train", model="tiny-cond", progress=False)
    assert sorted(made) == sorted(i for i in range(NUM_IMAGES) if f"image_{i:06d}.png" not in kept)
    resumed, fresh = files(out), files(reference)
    assert sorted(resumed) == sorted(fresh)  # no journal and no stale temporary is left
    assert resumed["manifest.csv"] == fresh["manifest.csv"]
    for name in fresh:
        if name.startswith("image_"):
            a, b = Image.open(out / name), Image.open(reference / name)
            assert a.text == b.text
            # Re-made images sit in other batches than in the fresh run; CPU kernels then differ in the last float
            # bits, which can move a pixel by one grey level at most.
            assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1


def test_a_launch_the_launcher_disagrees_with_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as if launched twice over, while Accelerate sees one process
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        save_images(load_pipeline(model_dir, device="cpu")[0], str(tmp_path / "synth"), 2, progress=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        run_evaluation(EvaluationArguments(real=str(tmp_path), fake=str(tmp_path)))
    assert not (tmp_path / "synth").exists()


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    train = phantom_dataset(40, 32, seed=0)
    datasets.DatasetDict(train=train, validation=phantom_dataset(24, 32, seed=1)).save_to_disk(root / "nih-like")
    (root / "synth").mkdir()
    for i, image in enumerate(phantom_dataset(20, 32, seed=2)["image"]):
        image.save(root / "synth" / f"{i:03d}.png")
    train[5]["image"].save(root / "synth" / "copy5.png")
    return root


def _flat(tree, path=()):
    if not isinstance(tree, dict):
        return {path: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, (*path, key)).items()}


def _evaluate_args(data, out, cache):
    # Batches of 8 and chunks of 16: every set's extraction and the 40-image training set's search really split.
    return ["--real", f"{data / 'nih-like'}:validation", "--fake", str(data / "synth"), "--train",
            f"{data / 'nih-like'}:train", "--features", "pixels", "--image_size", "32", "--audit_size", "16",
            "--batch_size", "8", "--chunk_size", "16", "--diversity_pairs", "20", "--kid_subsets", "5",
            "--null_percentile", "90", "--top_k", "2", "--output_dir", str(out), "--cache_dir", str(cache)]


def test_sharded_evaluation_matches_one_process(eval_data, tmp_path):
    evaluate_main(_evaluate_args(eval_data, tmp_path / "one", tmp_path / "cache-one"))
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    run_dir = tmp_path / "two-run"
    run_dir.mkdir()
    proc = launch(run_dir, "lunggen_diffusers.evaluate",
                  *_evaluate_args(eval_data, tmp_path / "two", tmp_path / "cache-two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for report in (one, two):
        report["recipe"].pop("output_dir"), report["recipe"].pop("cache_dir")
    # The features are the same bytes: each process embeds the batches one process would, and gathering moves bytes.
    for name in sorted(os.listdir(tmp_path / "cache-one")):
        assert np.array_equal(np.load(tmp_path / "cache-one" / name), np.load(tmp_path / "cache-two" / name))
    # So is the audit (neighbours, similarities, thresholds, flags): every process forms the chunk products one
    # process would, on the same CPU with one torch thread, and the merge keeps the same tie rule.
    one, two = _flat(one), _flat(two)
    assert one.keys() == two.keys()
    scores = [k for k in one if k[0] in ("metrics", "model_card") and isinstance(one[k], float)]
    assert {k: v for k, v in two.items() if k not in scores} == {k: v for k, v in one.items() if k not in scores}
    # The metrics are computed once, on the main process, from those same arrays, but FD's float64
    # eigendecompositions go through numpy's BLAS, whose blocking follows its thread count: all cores here, one per
    # launched process. That moves FD in the 8th digit (1.99614022 vs 1.99614024 measured); 1e-6 relative is ten
    # times that, and a different neighbour or a lost shard changes the metrics in the 2nd digit.
    assert [two[k] for k in scores] == pytest.approx([one[k] for k in scores], rel=1e-6)
    assert any(k[0] == "memorization" for k in one) and one[("memorization", "num_flagged")] >= 1
    for name in ("memorized_patients.csv", "nearest_pairs.png", "report.md"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    main, other = placed(run_dir)
    assert other == [] and {"metrics.json", "report.md", "nearest_pairs.png", "memorized_patients.csv"} <= set(main)
    assert proc.stdout.count("report written") == 1
    with open(tmp_path / "two" / "memorized_patients.csv") as f:
        assert next(csv.reader(f))[0].startswith("# LOCAL ONLY")
