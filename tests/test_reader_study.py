"""The reader study: a study folder that gives nothing away, a server that lets no one in without a token and loses
no answer to `kill -9`, two readers in a real browser at once, and statistics checked against hand computation."""

import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from lunggen_diffusers.data.phantom import phantom_dataset
from lunggen_diffusers.generation.output_folder import save_images
from lunggen_diffusers.reader_study import analysis, store
from lunggen_diffusers.reader_study.app import check_answer
from lunggen_diffusers.reader_study.cli import main as reader_study_main
from lunggen_diffusers.reader_study.study import create_study

from fixtures import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
PHANTOM_LABELS = {"condition_on": ["findings"], "findings": ["cardiomegaly", "consolidation", "nodule",
                                                            "pleural_effusion"],
                  "groups": {}, "combination_counts": {"": 4, "cardiomegaly": 4}, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A prepared real dataset (train and test splits of phantoms) and a conditional model's output folder, its
    images' labels drawn from the training counts (half asked for cardiomegaly, half for no finding)."""
    root = tmp_path_factory.mktemp("sources")
    real = phantom_dataset(168, 32, seed=1, finding_prob=0.3)
    datasets.DatasetDict({"train": real.select(range(8)), "test": real.select(range(8, 168))}).save_to_disk(
        str(root / "real"))
    pipe = tiny_pipeline(label_size=5, label_config=PHANTOM_LABELS)
    pipe.set_progress_bar_config(disable=True)
    save_images(pipe, str(root / "synth"), 12, num_inference_steps=2, progress=False, labels_from="train")
    return root


def make_study(sources, folder, **kwargs):
    options = {"real": str(sources / "real"), "synthetic": [str(sources / "synth")], "num_images": 8,
               "readers": ["alice:12", "bob:2"], "repeat_fraction": 0.25, "practice": 2, "seed": 3,
               "progress": False, **kwargs}
    return create_study(folder, **options)


def test_a_study_is_balanced_matched_and_gives_nothing_away(sources, tmp_path):
    made = make_study(sources, tmp_path / "study")
    db = sqlite3.connect(tmp_path / "study" / store.DATABASE)
    key = db.execute("SELECT id, origin, arm, findings, practice FROM images").fetchall()
    study = [k for k in key if not k[4]]
    assert sorted(k[1] for k in study) == ["real"] * 4 + ["synthetic"] * 4
    assert sorted(k[1] for k in key if k[4]) == ["real", "synthetic"]
    # The real images were matched to what the synthetic ones were asked for: the same finding lists.
    asked = sorted(k[3] for k in study if k[1] == "synthetic")
    shown = sorted(k[3] for k in study if k[1] == "real")
    assert asked == shown
    files = sorted((tmp_path / "study" / "images").iterdir())
    assert {f.stem for f in files} == {k[0] for k in key} and all(len(f.stem) == 32 for f in files)
    for f in files:  # one format: 8-bit grey at the generated images' size, no text chunks
        with Image.open(f) as im:
            assert (im.mode, im.size, im.info.keys() - {"dpi"}) == ("L", (16, 16), set())
    # Each reader: practice first, then the eight shuffled, one repeated later; orders differ between readers.
    orders = [db.execute("SELECT image_id, repeat, practice FROM items WHERE reader_id = ? ORDER BY position",
                         (r,)).fetchall() for r in (1, 2)]
    for order in orders:
        assert [p for _, _, p in order] == [1, 1] + [0] * 10
        assert len(order) == 2 + 8 + 2 and sum(r for _, r, _ in order) == 2
        first = {i: k for k, (i, r, _) in reversed(list(enumerate(order))) if not r}
        assert all(k > first[i] for k, (i, r, _) in enumerate(order) if r)
    assert orders[0] != orders[1]
    assert set(made["readers"]) == {"alice", "bob"} and len(made["organiser"]) >= 32


def test_create_refuses_in_one_line(sources, tmp_path, capsys):
    base = ["create", "--real", str(sources / "real"), "--synthetic", str(sources / "synth"), "--readers", "a"]
    cases = [(["--num_images", "7"], "--num_images 7: give a multiple of 2"),
             (["--num_images", "40"], "--synthetic synth: 12 images, the study needs 20"),
             (["--num_images", "4", "--readers", "a:x"], "--readers 'a:x': give NAME or NAME:YEARS")]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            reader_study_main([*base, "--output_dir", str(tmp_path / "s"), *extra])
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lunggen-reader-study serve` in its own process, on the loopback address."""

    def __init__(self, study):
        self.study, self.port, self.process = study, free_port(), None

    def start(self):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([sys.executable, "-m", "lunggen_diffusers.reader_study", "serve",
                                         str(self.study), "--port", str(self.port)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"the server did not start: {self.process.stdout.read().decode()}")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.url(path), timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def post(self, path: str, body):
        request = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, err.read()


@pytest.fixture
def served(sources, tmp_path):
    made = make_study(sources, tmp_path / "study")
    server = Server(tmp_path / "study").start()
    yield server, made
    if server.process.poll() is None:
        server.kill()


def image_id(page: bytes) -> str:
    return page.decode().split("/image/")[1][:32]


def answer(position, call="real"):
    return {"position": position, "call": call, "confidence": 3, "quality": 4, "findings": ["nodule"],
            "comment": "", "seconds": 1.5}


def test_no_valid_token_no_entry(served):
    server, made = served
    token = made["readers"]["alice"]
    status, _, page = server.get(f"/r/{token}")
    assert status == 200
    mine = image_id(page)
    altered = token[:-1] + ("y" if token.endswith("x") else "x")  # one character off, never the token itself
    for path in ["/", "/r/", "/r/wrong", f"/r/{altered}", f"/r/wrong/image/{mine}", "/organiser/wrong",
                 f"/organiser/{token}", f"/r/{made['organiser']}", "/docs", "/openapi.json", "/images/" + mine,
                 f"/r/{token}/image/..%2F..%2Fstudy.sqlite", f"/r/{token}/image/{mine}.png",
                 f"/r/{token}/image/%2e%2e%2fstudy.sqlite", f"/r/{token}/image/{'0' * 32}"]:
        assert server.get(path)[0] == 403, path
    assert server.post("/r/wrong/answer", answer(0))[0] == 403
    assert server.get(f"/r/{token}/image/{mine}")[0] == 200
    status, _, organiser = server.get(f"/organiser/{made['organiser']}")
    assert status == 200 and b"alice" in organiser and b"0 / 12" in organiser and b"nodule" not in organiser


def test_a_bad_answer_is_refused_and_nothing_is_stored(served, tmp_path):
    server, made = served
    token = made["readers"]["alice"]
    for bad in [{**answer(0), "confidence": "3"}, {**answer(0), "confidence": True}, {**answer(0), "quality": 6},
                {**answer(0), "call": "maybe"}, {**answer(0), "findings": ["fracture"]}, {**answer(0), "findings": "nodule"},
                {k: v for k, v in answer(0).items() if k != "position"}, [answer(0)], "real"]:
        assert server.post(f"/r/{token}/answer", bad)[0] == 400, bad
    assert server.post(f"/r/{token}/answer", {**answer(99)})[0] == 400  # no such item
    assert sqlite3.connect(tmp_path / "study" / store.DATABASE).execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 0


def test_the_request_model_sorts_findings_and_cuts_the_comment():
    checked = check_answer(json.dumps({**answer(2), "findings": ["nodule", "cardiomegaly"], "comment": "x" * 3000,
                                       "seconds": 2}).encode(), ["cardiomegaly", "nodule"])
    assert (checked.findings, len(checked.comment), checked.seconds) == (["cardiomegaly", "nodule"], 2000, 2.0)


def test_every_token_is_compared_in_constant_time(sources, tmp_path, monkeypatch):
    made = make_study(sources, tmp_path / "study")
    compared = []

    def compare_digest(a, b):
        compared.append(b)
        return a == b

    monkeypatch.setattr(store.secrets, "compare_digest", compare_digest)
    with store.opened(tmp_path / "study") as db:
        assert store.reader_by_token(db, made["readers"]["bob"])["name"] == "bob"
        assert store.reader_by_token(db, "wrong") is None
        assert store.is_organiser(db, made["organiser"]) and not store.is_organiser(db, "wrong")
    assert compared.count(b"wrong") == 3  # each reader's token and the organiser's, none skipped by SQL


def test_serve_imports_neither_torch_nor_diffusers():
    """`serve` answers its first request within 2 s (benchmarks/reader_study_benchmark.py) because its command
    never imports the model stack."""
    code = ("import sys, lunggen_diffusers.reader_study.cli, lunggen_diffusers.reader_study.app; "
            "print(sorted(m for m in ('torch', 'diffusers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_real_and_synthetic_items_look_alike_but_for_pixels(served, tmp_path):
    server, made = served
    token = made["readers"]["bob"]
    db = sqlite3.connect(tmp_path / "study" / store.DATABASE)
    seen = {}
    for position in range(12):
        status, _, page = server.get(f"/r/{token}")
        current = image_id(page)
        origin = db.execute("SELECT origin FROM images WHERE id = ?", (current,)).fetchone()[0]
        _, headers, png = server.get(f"/r/{token}/image/{current}")
        headers = {k.lower(): v for k, v in headers.items() if k.lower() not in ("date", "content-length")}
        normalised = re.sub(rb'(name="position" value=|id="progress" value=)"\d+"|Image \d+ of', b"POSITION",
                            page.replace(current.encode(), b"ID"))
        with Image.open(io.BytesIO(png)) as im:
            seen.setdefault(origin, []).append((normalised, headers, im.mode, im.size, tuple(sorted(im.info))))
        assert server.post(f"/r/{token}/answer", answer(position))[0] == 200
    real, synthetic = seen["real"], seen["synthetic"]
    practice_free = [s for s in real + synthetic if b"<b>practice</b>" not in s[0]]
    assert len({s[0] for s in practice_free}) == 1  # the same page, byte for byte, once ID and position are out
    assert len({json.dumps(s[1:], sort_keys=True) for s in real + synthetic}) == 1  # headers, format, chunks
    assert server.get(f"/r/{token}")[2].count(b"You have answered all 12") == 1


def test_kill_9_loses_no_answer_and_the_reader_resumes(served, tmp_path):
    server, made = served
    token = made["readers"]["alice"]
    for position in range(5):
        status, reply = server.post(f"/r/{token}/answer", answer(position, "synthetic"))
        assert status == 200 and reply["stored"]
    assert server.post(f"/r/{token}/answer", answer(4, "real"))[1]["stored"] is False  # never overwritten
    server.kill()
    server.start()
    db = sqlite3.connect(tmp_path / "study" / store.DATABASE)
    assert db.execute("SELECT position, call FROM answers ORDER BY position").fetchall() == \
        [(k, "synthetic") for k in range(5)]
    assert b"Image 6 of 12" in server.get(f"/r/{token}")[2]


def chromium():
    """A headless Chromium through Selenium, or a skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium/chromedriver (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(driver))


def read_study(driver, url: str, reload_at: int | None, log: list):
    """Answer every item with the keyboard, as a reader would; reload the page once at `reload_at`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def text(element_id):  # read through JavaScript: no element handle to go stale across page loads
        return driver.execute_script("const e = document.getElementById(arguments[0]); "
                                     "return e ? e.textContent : null;", element_id)

    def next_page():  # wait for a document this loop has not marked yet, then mark it
        wait.until(lambda d: d.execute_script("return !window.seen && document.readyState === 'complete'"))
        driver.execute_script("window.seen = true")

    wait = WebDriverWait(driver, 30)
    driver.get(url)
    for k in range(12):
        next_page()
        count, practice = text("count"), "practice" in text("panel")
        if reload_at == k:
            driver.refresh()
            next_page()
            assert text("count") == count  # the same image again, nothing skipped
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("s" if k % 2 else "r", str(1 + k % 5), Keys.SHIFT + str(1 + (k + 2) % 5) + Keys.SHIFT,
                       Keys.ENTER)
        log.append(count)
        if practice:
            wait.until(lambda d: "This image is" in text("feedback"))
            body.send_keys(Keys.ENTER)
    next_page()
    assert text("done")


def test_two_readers_complete_a_study_in_a_real_browser_at_once(served, tmp_path):
    server, made = served
    drivers = [chromium(), chromium()]
    try:
        logs, errors = [[], []], []

        def reader(k, name, reload_at):
            try:
                read_study(drivers[k], server.url(f"/r/{made['readers'][name]}"), reload_at, logs[k])
            except Exception as err:  # reported below with the reader's name
                errors.append(f"{name}: {err!r}")

        threads = [threading.Thread(target=reader, args=(0, "alice", 5)),
                   threading.Thread(target=reader, args=(1, "bob", None))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors
    finally:
        for d in drivers:
            d.quit()
    db = sqlite3.connect(tmp_path / "study" / store.DATABASE)
    rows = db.execute("SELECT reader_id, position, call, confidence, quality FROM answers ORDER BY 1, 2").fetchall()
    assert [r[:2] for r in rows] == [(r, p) for r in (1, 2) for p in range(12)]  # every item, once, both readers
    assert [r[2:] for r in rows if r[0] == 2] == [("synthetic" if k % 2 else "real", 1 + k % 5, 1 + (k + 2) % 5)
                                                  for k in range(12)]
    assert logs[0] == [f"Image {k + 1} of 12" for k in range(12)]  # the reload resumed where alice stood


def planted(tmp_path):
    """A study database with answers set by hand: two readers, four images (two real, two synthetic)."""
    folder = tmp_path / "planted"
    db = store.create(folder)
    settings = {"arms": ["m"], "num_images": 4, "per_arm": 2, "size": 8, "ask_findings": True,
                "vocabulary": ["nodule"], "organiser_token": "o"}
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in settings.items()])
    images = [("r1", "real", None, ["nodule"]), ("r2", "real", None, []), ("s1", "synthetic", "m", ["nodule"]),
              ("s2", "synthetic", "m", [])]
    db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, 'F', 'PA', '', 0, 0)",
                   [(i, o, a, json.dumps(f)) for i, o, a, f in images])
    # (call, confidence, findings) per reader and image, in the order r1 r2 s1 s2
    answers = {1: [("real", 4, ["nodule"]), ("synthetic", 2, []), ("synthetic", 5, []), ("real", 3, [])],
               2: [("real", 5, ["nodule"]), ("real", 1, []), ("synthetic", 3, ["nodule"]), ("real", 2, [])]}
    for reader, rows in answers.items():
        db.execute("INSERT INTO readers VALUES (?, ?, ?, ?, 0)", (reader, f"reader{reader}", reader * 4.0,
                                                                    f"t{reader}"))
        for position, ((image, *_), (call, confidence, seen)) in enumerate(zip(images, rows, strict=True)):
            db.execute("INSERT INTO items VALUES (?, ?, ?, 0, 0)", (reader, position, image))
            store.record_answer(db, reader, position, {"call": call, "confidence": confidence, "quality": 3,
                                                       "findings": seen, "comment": ""})
    db.close()
    return folder


def test_planted_answers_give_the_hand_computed_figures(tmp_path):
    result = analysis.analyze(planted(tmp_path), num_resamples=200)
    pooled = result["pooled"]
    # Correct: reader 1 r1 and s1 (2 of 4), reader 2 r1, r2 and s1 (3 of 4).
    assert (pooled["correct"], pooled["readings"]) == (5, 8) and pooled["accuracy"] == 0.625
    assert result["by"]["reader"]["reader1"]["accuracy"] == 0.5 and result["by"]["reader"]["reader2"]["accuracy"] \
        == 0.75
    # Binomial: P(X <= 3 or X >= 5 | n = 8) = 1 - C(8, 4) / 256.
    assert pooled["p_binomial"] == pytest.approx(1 - 70 / 256)
    # Scores (+c synthetic, -c real): real -4 +2 -5 -1, synthetic +5 -3 +3 -2. Synthetic above real: 4 + 2 + 4 + 2
    # of the 16 pairs.
    assert pooled["auroc"] == pytest.approx(12 / 16)
    lo, hi = pooled["auroc_interval"]
    assert lo <= pooled["auroc"] <= hi
    # Calls: reader 1 R S S R, reader 2 R R S R: agree on 3 of 4; "real" 2/4 and 3/4: chance .5*.75 + .5*.25 = .5.
    assert result["between_readers"] == {"readers": 2, "images": 4, "kappa": 0.5, "statistic": "Cohen"}
    cells = result["findings"]["nodule"]
    assert cells["real, labelled"]["share"] == 1.0 and cells["synthetic, asked for"]["share"] == 0.5
    assert set(result["by"]["experience"]) == {"<5 y", "5-10 y"}
    out = analysis.write_report(result, tmp_path / "report")
    assert "0.625" in (out / "report.md").read_text() and "## Reader study" in (out / "card_section.md").read_text()
    assert Image.open(out / "accuracy.png").size[0] == 640


def test_kappa_statistics_against_hand_values():
    from lunggen_diffusers.evaluation.stats import (
        cohen_kappa,
        fleiss_kappa,
        mann_whitney,
    )

    # Two raters, 10 items: agree on 7; a says yes 5 times, b 4 times: chance .5*.4 + .5*.6 = .5, kappa .4.
    a = list("yyyyynnnnn")
    b = list("yyynnnnnny")
    assert cohen_kappa(a, b) == pytest.approx((0.7 - 0.5) / 0.5)
    # Fleiss' worked example shape: 3 raters all agreeing on every item -> 1.
    assert fleiss_kappa(np.array([[3, 0], [0, 3], [3, 0]])) == pytest.approx(1.0)
    # One rater out on every item of two categories: P_i = 1/3, p = (1/2, 1/2): (1/3 - 1/2) / (1/2) = -1/3.
    assert fleiss_kappa(np.array([[2, 1], [1, 2]])) == pytest.approx(-1 / 3)
    u, p = mann_whitney([1, 2, 3], [4, 5, 6])
    assert u == 0 and 0.04 < p < 0.1  # scipy's asymptotic method with continuity correction: 0.0809


def test_the_readme_planning_table_is_the_function():
    rows = analysis.planning_table()
    readme = (REPO / "README.md").read_text()
    for row in rows:
        assert "| " + " | ".join([str(row[0])] + [f"{w:.3f}" for w in row[1:]]) + " |" in readme


def test_serve_binds_to_loopback_and_warns_otherwise(sources, tmp_path, monkeypatch, capsys):
    import uvicorn

    make_study(sources, tmp_path / "study")
    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: bound.append((host, port)))
    reader_study_main(["serve", str(tmp_path / "study")])
    first = capsys.readouterr()
    reader_study_main(["serve", str(tmp_path / "study"), "--host", "0.0.0.0", "--port", "9000"])
    second = capsys.readouterr()
    assert bound == [("127.0.0.1", 8000), ("0.0.0.0", 9000)]
    assert "warning" not in first.err and second.err.startswith("warning: serving on 0.0.0.0")
    assert "http://127.0.0.1:8000/r/" in first.out and "/organiser/" in first.out
