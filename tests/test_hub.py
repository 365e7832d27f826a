"""Model card, manifest and push: no network (the Hub is intercepted or replaced by a local Hub cache)."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import numpy as np
import pytest
from diffusers import DDPMPipeline
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from PIL import Image

from lunggen_diffusers import LungGenPipeline, hub
from lunggen_diffusers.config import save_config
from lunggen_diffusers.hub import card as card_module
from lunggen_diffusers.hub import cli as hub_cli
from lunggen_diffusers.lunggen_pipeline import LabelSpace
from lunggen_diffusers.summaries import DataSummary, RunSummary
from lunggen_diffusers.training.model import build_scheduler, build_unet

TOKEN = "hf_SeCrEtT0kenNeverShown123"
NIH_SOURCE = "the NIH ChestX-ray14 folder (official train_val list)"
PIPELINE_FILES = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                  "unet/diffusion_pytorch_model.safetensors"}
# The `model_card` section as lunggen_diffusers/evaluation/report.py writes it.
METRICS = {"fd": 12.5, "kid": 0.0123, "precision": 0.61, "recall": 0.4, "density": 0.8, "coverage": 0.5,
           "ms_ssim_generated": 0.31}
EVAL = {"recipe": {"train": "/never/published"}, "model_card": {
    "reference": "held-out real images (64, halves for the floor)", "feature_extractor": "downsampled pixels",
    "image_size": 32, "num_generated": 64, "num_real": 64, "metrics": METRICS,
    "real_vs_real_floor": {"fd": 3.25, "kid": 0.001, "ms_ssim_real": 0.3, "generated_same_size": {"fd": 14.0}},
    "memorization": {"flagged_fraction": 0.015625, "null_flagged_fraction": 0.01, "null_percentile": 99.0,
                     "num_flagged": 1, "num_train": 24, "num_null": 64, "matched_by": "patient"}}}


# Stored label counts as conditioning.label_config writes them (100 images; no identifiers).
LABELS = {"condition_on": ["findings", "view_position", "patient_sex"],
          "findings": ["Cardiomegaly", "Effusion", "Pleural_Thickening"],
          "groups": {"view_position": ["AP", "PA"], "patient_sex": ["F", "M"]},
          "combination_counts": {"patient_sex=M|view_position=PA": 50, "Cardiomegaly|patient_sex=F|view_position=AP": 30,
                                 "Effusion|Pleural_Thickening|patient_sex=F|view_position=PA": 20},
          "guidance_scale": 3.0}
KEY_OPTIONS = {"resolution", "block_out_channels", "layers_per_block", "attention_resolutions", "ddpm_num_steps",
               "ddpm_beta_schedule", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
               "lr_scheduler", "lr_warmup_steps", "use_ema", "ema_max_decay", "prediction_type", "snr_gamma",
               "mixed_precision", "condition_on"}


def _summary(source=NIH_SOURCE, demographics=None):
    listing = "9" * 64 if source == NIH_SOURCE else None  # the phantom has no image identifiers
    return DataSummary(source=source, split="train", num_images=24, fingerprint="a1b2c3d4e5f60718",
                       image_list_sha256=listing, demographics=demographics or {})


RUN = RunSummary(global_step=4, final_loss=0.0421, wall_time_s=3725.0, hardware="1x CPU")


@pytest.fixture
def secret_dir(tmp_path):
    path = tmp_path / "Secret_NIH_Source_7f3a" / "images_001"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def export(tmp_path, tiny_config, secret_dir):
    """An output folder as training leaves it, plus the things that must never be uploaded."""

    def make(source=NIH_SOURCE, with_eval=True, labels=None, demographics=None, eval_metrics=EVAL, **overrides):
        if labels is not None:
            overrides.update(condition_on=labels["condition_on"], guidance_scale=labels["guidance_scale"])
        config = tiny_config(train_data_dir=str(secret_dir), cache_dir=str(secret_dir.parent / "cache"),
                             ddpm_num_steps=30, hub_token=TOKEN, **overrides)
        out = Path(config.training.output_dir)
        if labels is None:
            DDPMPipeline(unet=build_unet(config), scheduler=build_scheduler(config)).save_pretrained(out)
        else:  # as training exports a conditional model: the pipeline code and the label config beside the weights
            LungGenPipeline(unet=build_unet(config, LabelSpace(labels).size), scheduler=build_scheduler(config),
                            label_config=labels).save_pretrained(out, safe_serialization=True)
        save_config(config, out / "training_config.json")
        Image.fromarray(np.full((64, 64), 128, np.uint8)).save(out / "samples.png")
        (out / "samples").mkdir()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(out / "samples" / "step-000002.png")
        for junk in ("checkpoint-2/unet/diffusion_pytorch_model.safetensors", "checkpoint-2/optimizer.bin",
                     "logs/events.out.tfevents.1", "eval/nearest_pairs.png", "eval/memorized_patients.csv",
                     "unet/diffusion_pytorch_model.bin", "pytorch_model.pkl"):
            (out / junk).parent.mkdir(parents=True, exist_ok=True)
            (out / junk).write_text(f"{secret_dir}/00000001_000.png,00000001\n")
        if with_eval:
            (out / "eval" / "metrics.json").write_text(json.dumps(eval_metrics))
        hub.write_manifest(out, config, _summary(source, demographics), RUN)
        hub.write_model_card(out)
        return out

    return make


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what would be sent to the Hub: create_repo arguments and the commit's files."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        calls["files"] = {}
        for op in operations:
            src = op.path_or_fileobj
            calls["files"][op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        calls["commit"] = kwargs

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_card_parses_with_metadata_sections_and_eval(export, secret_dir):
    out = export()
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "diffusers" and data.pipeline_tag == "unconditional-image-generation"
    assert data.license == "other" and data.license_name == "lunggen-research-only"
    assert {"medical-imaging", "chest-x-ray", "ddpm", "diffusers-training"} <= set(data.tags)
    assert data.datasets is None  # a local NIH folder is no Hub dataset id
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == METRICS
    text = card.text
    assert "| `generated_same_size.fd` | 14 |" in text and "| `matched_by` | patient |" in text
    assert "/never/published" not in text  # only the model_card section of metrics.json is read
    for heading in ("## What it generates", "## How to use", "## Training data", "## Training procedure",
                    "## Evaluation", "### Memorization audit", "### Real-vs-real floor", "## Intended use",
                    "## Limitations and biases", "## Citation"):
        assert heading in text
    assert "TODO" not in str(card).upper()
    assert "No re-identification check was run for this export" in text
    assert "32x32 pixels, 1 channel" in text and "![samples](samples.png)" in text
    assert "Unconditional: findings, views or demographics cannot be requested." in text
    assert "trust_remote_code" not in text and "class-conditional" not in data.tags
    assert "research use only" in text.lower() and "not for clinical use or diagnosis" in text.lower()
    assert "10.5281/zenodo.18454685" in text and "2006.11239" in text and "ChestX-ray8" in text
    assert "NIH Clinical Center is the data provider" in text and "30,805 patients" in text
    assert "1 h 02 min" in text and "1x CPU" in text and "0.0421" in text
    saved = json.loads((out / "training_config.json").read_text())
    assert f"preset `{saved['preset']}`" in text and "[`training_config.json`](training_config.json)" in text
    shown = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}
    assert KEY_OPTIONS <= shown  # the options that matter are on the card; the rest is one link away
    assert not {"adam_beta1", "train_data_dir", "logging_steps", "guidance_scale"} & shown
    assert f"| `ddpm_num_steps` | {saved['ddpm_num_steps']} |" in text and "| `block_out_channels` | 16, 32 |" in text
    for published in ("README.md", "manifest.json", "eval_results.json"):
        content = (out / published).read_text()
        assert "Secret_NIH_Source_7f3a" not in content and str(out) not in content and TOKEN not in content


def test_the_card_shows_the_re_identification_figures(export):
    reid = {"generated above the threshold": "30.40% [26.53%, 34.57%]",
            "held-out real (null) above the threshold": "1.71% [0.62%, 4.59%]", "flagged": "yes",
            "verifier": "cnn, AUROC 0.9978 on 404 held-out patients"}
    out = export(eval_metrics={**EVAL, "model_card": {**EVAL["model_card"], "reidentification": reid}})
    text = (out / "README.md").read_text()
    section = text.split("### Re-identification risk", 1)[1].split("\n## ", 1)[0]
    for name, value in reid.items():
        assert f"| {name} | {value} |" in section or f"| `{name}` | {value} |" in section, name
    assert "No re-identification check" not in text


def test_card_wording_lives_in_the_template(export, tmp_path, monkeypatch):
    """The wording changes with model_card.md alone, rendered by huggingface_hub's ModelCard.from_template."""
    out = export(with_eval=False)
    edited = tmp_path / "model_card.md"
    edited.write_text(card_module.TEMPLATE.read_text().replace("## Intended use", "## Intended use (edited)"))
    rendered = []
    real = ModelCard.from_template

    def spy(card_data, template_path=None, **kwargs):
        rendered.append(template_path)
        return real(card_data, template_path=template_path, **kwargs)

    monkeypatch.setattr(ModelCard, "from_template", spy)
    monkeypatch.setattr(card_module, "TEMPLATE", edited)
    hub.write_model_card(out)
    assert rendered == [str(edited)]
    card = ModelCard.load(out / "README.md")
    assert "## Intended use (edited)" in card.text and card.data.license_name == "lunggen-research-only"


def test_manifest_is_scrubbed_and_complete(export, secret_dir):
    out = export()
    manifest = json.loads((out / "manifest.json").read_text())
    config = manifest["config"]
    assert config["train_data_dir"] == ["<local>"] and config["cache_dir"] == "<local>"
    assert config["output_dir"] == "out" and config["logging_dir"] == "logs" and "hub_token" not in config
    assert config["resolution"] == 32 and manifest["seed"] == config["seed"] == 0
    assert manifest["data"]["image_list_sha256"] == "9" * 64 and manifest["data"]["num_images"] == 24
    assert manifest["training"] == {"global_step": 4, "wall_time_s": 3725.0, "hardware": "1x CPU",
                                    "final_loss": 0.0421}
    assert {"python", "torch", "diffusers", "huggingface_hub"} <= set(manifest["libraries"])
    assert "git_commit" in manifest and "git_dirty" in manifest


def test_phantom_card_without_eval_says_so(export):
    out = export(source="the built-in procedural chest phantom", with_eval=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and not (out / "eval_results.json").exists()
    assert "No evaluation was run" in card.text and "No memorization audit was run" in card.text
    assert "procedural chest phantom, not on patient images" in card.text
    assert "no image list hash" in card.text
    assert "ChestX-ray8" not in card.text and "NIH Clinical Center" not in card.text


def test_scrub_config_keeps_hub_ids_and_hides_folders(tmp_path):
    assert hub.scrub_config({"dataset_name": "org/cxr"})["dataset_name"] == "org/cxr"
    assert hub.scrub_config({"dataset_name": "org/cxr:train"})["dataset_name"] == "org/cxr:train"
    (tmp_path / "prepared").mkdir()
    for local in (str(tmp_path / "prepared"), f"{tmp_path / 'prepared'}:validation", "./data/x", "/abs/a/b"):
        assert hub.scrub_config({"dataset_name": local})["dataset_name"] == "<local>", local
    assert hub.scrub_config({"resume_from_checkpoint": "/runs/x/checkpoint-500/"}) == {
        "resume_from_checkpoint": "checkpoint-500"}
    assert hub.scrub_config({"train_data_dir": None, "hub_token": TOKEN}) == {"train_data_dir": None}


def test_leaking_eval_summary_is_refused(export, secret_dir):
    out = export(with_eval=False)
    before = _snapshot(out)
    leaky = {"model_card": {"reference": f"images in {secret_dir}", "metrics": {"fd": 1.0}}}
    with pytest.raises(ValueError, match="local path"):
        hub.write_model_card(out, leaky)
    assert _snapshot(out) == before


def test_data_summary_refuses_a_path_as_source(secret_dir):
    with pytest.raises(ValueError, match="is a path"):
        _summary(str(secret_dir))


def test_push_is_private_by_default_and_uploads_only_the_allow_list(export, fake_hub, capsys, caplog):
    out = export()
    caplog.set_level(logging.DEBUG)
    url = hub.push_to_hub(out, "my-org/lunggen-tiny", token=TOKEN)
    assert url == "https://huggingface.co/my-org/lunggen-tiny"
    assert fake_hub["repo"]["private"] is True and fake_hub["repo"]["repo_id"] == "my-org/lunggen-tiny"
    assert fake_hub["repo"]["token"] == TOKEN  # handed to huggingface_hub, and only there
    expected = PIPELINE_FILES | {"README.md", "manifest.json", "training_config.json", "eval_results.json",
                                 "samples.png", "samples/step-000002.png"}
    assert set(fake_hub["files"]) == expected
    assert set(hub.files_to_upload(out)) == expected  # the same selection the commit made from the real listing
    for name, content in fake_hub["files"].items():
        assert b"Secret_NIH_Source_7f3a" not in content and TOKEN.encode() not in content, name
    uploaded_config = json.loads(fake_hub["files"]["training_config.json"])
    assert uploaded_config["train_data_dir"] == ["<local>"] and uploaded_config["output_dir"] == "out"
    assert "Secret_NIH_Source_7f3a" in (out / "training_config.json").read_text()  # the local copy is untouched
    card = fake_hub["files"]["README.md"].decode()
    assert 'DDPMPipeline.from_pretrained("my-org/lunggen-tiny")' in card and "| `coverage` | 0.5 |" in card
    assert (out / "README.md").read_text() == card  # the local card matches what was pushed
    logged = capsys.readouterr()
    assert TOKEN not in logged.out + logged.err + caplog.text


@pytest.mark.parametrize("flag", ["--private", "--hub_private_repo"])
def test_cli_push_public_on_request(export, fake_hub, capsys, flag):
    out = export(with_eval=False)
    assert hub_cli.main(["push", str(out), "--repo_id", "org/name", flag, "false", "--hub_token", TOKEN]) is None
    assert fake_hub["repo"]["private"] is False and fake_hub["repo"]["token"] == TOKEN
    printed = capsys.readouterr().out
    assert "public" in printed and TOKEN not in printed


def _http_error(status):
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("error, words", [
    (OfflineModeIsEnabled("offline"), "offline mode"),
    (_http_error(401), "hf auth login"),
    (_http_error(403), "write access"),
    (httpx2.ConnectError("[Errno -2] Name or service not known"), "unreachable"),
])
def test_push_failures_are_one_clear_line_and_leave_the_output(export, monkeypatch, capsys, error, words):
    out = export()
    before = _snapshot(out)

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(HfApi, "create_repo", fail)
    with pytest.raises(SystemExit) as exit_:
        hub_cli.main(["push", str(out), "--repo_id", "org/name", "--token", TOKEN])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot push to org/name:") and words in err and err.count("\n") == 1
    assert TOKEN not in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_cli_card_reads_eval_dir_and_the_push_keeps_it(export, fake_hub, tmp_path, capsys):
    out = export(with_eval=False)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps(EVAL))
    assert hub_cli.main(["card", str(out), "--eval_dir", str(eval_dir)]) is None
    assert ModelCard.load(out / "README.md").data.eval_results[0].metric_value == 12.5
    hub.push_to_hub(out, "org/name")  # regenerates the card from manifest + the kept eval summary
    assert "| `coverage` | 0.5 |" in fake_hub["files"]["README.md"].decode()
    with pytest.raises(SystemExit) as exit_:
        hub_cli.main(["card", str(out), "--eval_dir", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as exit_:
        hub_cli.main(["publish", str(out)])
    assert exit_.value.code == 2


def test_pushed_files_load_from_the_hub_cache_as_users_will(export, fake_hub, tmp_path):
    """What the push would upload, laid out as a Hub cache: the pipeline loads, the card loads, its snippet runs."""
    out = export()
    hub.push_to_hub(out, "org/name")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_cache" / "models--org--name"
    for name, content in fake_hub["files"].items():
        (repo / "snapshots" / revision / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / revision / name).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.rmtree(out)  # nothing may come from the local folder
    script = (
        "import re\n"
        "from diffusers import DDPMPipeline\n"
        "from huggingface_hub import ModelCard\n"
        "pipe = DDPMPipeline.from_pretrained('org/name')\n"
        "assert pipe.unet.config.sample_size == 32 and pipe.unet.config.in_channels == 1\n"
        "card = ModelCard.load('org/name')\n"
        "assert card.data.library_name == 'diffusers' and card.data.eval_results\n"
        "exec(re.search(r'```python\\n(.*?)```', card.text, re.S).group(1))\n"
        "print('loaded', images[0].mode, images[0].size)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loaded L (32, 32)" in run.stdout
    snippet = fake_hub["files"]["README.md"].decode()
    assert "num_inference_steps=30," in snippet and "num_inference_steps=15," in snippet


def test_conditional_card_states_vocabulary_prevalence_guidance_and_usage(export):
    out = export(labels=LABELS)
    card = ModelCard.load(out / "README.md")
    text = card.text
    assert card.data.pipeline_tag == "unconditional-image-generation"  # the Hub has no label-conditioned task
    assert {"class-conditional", "classifier-free-guidance", "custom_code", "chest-x-ray"} <= set(card.data.tags)
    assert "cannot be requested" not in text and "finding-conditioned" in text
    assert "- Findings: Cardiomegaly, Effusion, Pleural_Thickening." in text
    assert "- View position (`view_position=`): AP, PA." in text and "- Sex (`patient_sex=`): F, M." in text
    for row in ("| findings | No Finding | 50 | 50.0% |", "| findings | Cardiomegaly | 30 | 30.0% |",
                "| findings | Pleural_Thickening | 20 | 20.0% |", "| view_position | PA | 70 | 70.0% |",
                "| patient_sex | F | 50 | 50.0% |"):
        assert row in text, row
    assert "Recommended: **3.0**, the pipeline's default" in text and "`--guidance_scale 3.0` at training" in text
    assert "10% of images shown the null condition" in text
    assert 'LungGenPipeline.from_pretrained("out")' in text
    assert 'DiffusionPipeline.from_pretrained("out", trust_remote_code=True)' in text
    assert 'pipe(findings=[["Cardiomegaly"], []], guidance_scale=3.0, num_inference_steps=30,' in text
    assert "| `condition_on` | findings, view_position, patient_sex |" in text and "| `guidance_scale` | 3 |" in text
    assert "A label is a request, not a diagnosis" in text


def test_conditional_card_with_the_default_guidance_says_it_was_not_tuned(export):
    out = export(labels={**LABELS, "guidance_scale": 2.0})
    text = ModelCard.load(out / "README.md").text
    assert "Recommended: **2.0**" in text and "not tuned on this model" in text


def test_pipeline_code_without_a_label_config_is_refused(export):
    out = export(with_eval=False)
    (out / "lunggen_pipeline.py").write_text("# stray\n")
    with pytest.raises(ValueError, match="has lunggen_pipeline.py but model_index.json has no label_config"):
        hub.write_model_card(out)


def test_conditional_push_loads_both_ways_from_the_hub_cache(export, fake_hub, tmp_path):
    """The pushed conditional repo, laid out as a Hub cache: both snippets of its card run offline."""
    out = export(labels=LABELS)
    hub.push_to_hub(out, "org/cond")
    assert fake_hub["repo"]["private"] is True and "lunggen_pipeline.py" in fake_hub["files"]
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_cache" / "models--org--cond"
    for name, content in fake_hub["files"].items():
        (repo / "snapshots" / revision / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / revision / name).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.rmtree(out)
    script = (
        "import re\n"
        "from huggingface_hub import ModelCard\n"
        "card = ModelCard.load('org/cond')\n"
        "ours, remote = re.findall(r'```python\\n(.*?)```', card.text, re.S)\n"
        "exec(ours)\n"
        "print('ours', type(pipe).__name__, len(images), images[0].mode)\n"
        "exec(remote)\n"
        "print('remote', type(pipe).__name__, len(images), images[0].size)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's package, not another install
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ours LungGenPipeline 2 L" in run.stdout and "remote LungGenPipeline 2 (32, 32)" in run.stdout


# ------------------------------------------------------------------ sections written by other tools (--*_dir)
FIDELITY = "## Fidelity on the phantom\n\n| scale | cardiomegaly present |\n|---|---|\n| 2 | 0.93 |\n"
UTILITY = "## Downstream utility\n\nMacro AUROC 0.81 (0.74 to 0.87, bootstrap over 40 test patients).\n"
READERS = "## Reader study\n\n3 readers told real from synthetic in 0.58 of 600 readings (95% CI 0.54 to 0.62).\n"


def _section_dir(root, name, text):
    folder = root / name
    folder.mkdir()
    (folder / "card_section.md").write_text(text)
    return folder


def test_sections_are_included_verbatim_in_a_fixed_place_and_the_push_keeps_them(export, fake_hub, tmp_path):
    out = export(labels=LABELS)
    fidelity, utility = _section_dir(tmp_path, "fid", FIDELITY), _section_dir(tmp_path, "util", UTILITY)
    readers = _section_dir(tmp_path, "readers", READERS)
    assert hub_cli.main(["card", str(out), "--reader_study_dir", str(readers), "--utility_dir", str(utility),
                         "--fidelity_dir", str(fidelity)]) is None
    text = (out / "README.md").read_text()
    order = [text.index(s) for s in ("### Memorization audit", FIDELITY.strip(), UTILITY.strip(), READERS.strip(),
                                     "## Intended use")]
    assert order == sorted(order)  # after the evaluation: fidelity, utility, readers, whatever the flag order
    assert "The fidelity section below measures" in text  # the guidance advice points at it
    hub.push_to_hub(out, "org/name")  # no dirs given: the sections kept from the last card stay on it
    pushed = fake_hub["files"]["README.md"].decode()
    assert FIDELITY.strip() in pushed and UTILITY.strip() in pushed
    assert not [name for name in fake_hub["files"] if name.startswith("card_sections")]  # local copies only
    assert hub_cli.main(["card", str(out)]) is None and UTILITY.strip() in (out / "README.md").read_text()


def test_a_card_without_sections_has_none(export):
    text = ModelCard.load(export(labels=LABELS) / "README.md").text
    assert "## Fidelity" not in text and "The fidelity section below" not in text


@pytest.mark.parametrize("flag, content, words", [
    ("--fidelity_dir", None, "--fidelity_dir {dir}: no card_section.md in it (written by benchmarks/fidelity_benchmark"),
    ("--utility_dir", "Downstream utility\n\nno heading", "card_section.md must start with a '## ' heading"),
])
def test_a_section_dir_without_a_usable_card_section_is_refused(export, tmp_path, capsys, flag, content, words):
    out = export(with_eval=False)
    before = _snapshot(out)
    folder = tmp_path / "section"
    folder.mkdir()
    if content is not None:
        (folder / "card_section.md").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        hub_cli.main(["card", str(out), flag, str(folder)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words.format(dir=folder) in err and err.count("\n") == 1
    assert _snapshot(out) == before


@pytest.mark.parametrize("leak, words", [
    ("{secret}/00000001_000.png", "local path"),
    ("{section}/grid.png", "local path"),  # the section folder is a local path too
    ("nearest pair: 00012345_001.png", "an NIH image name ('00012345_001.png')"),
    ("most copied: phantom-3-17", "a phantom patient id ('phantom-3-17')"),
    ("nearest: dicom-0123456789abcdef", "a DICOM patient pseudonym ('dicom-0123456789abcdef')"),
    ("worst case Patient ID: 12345", "a patient id ('Patient ID: 12345')"),
    ("| patient_id | flagged_matches |\n|---|---|\n| 7 | 3 |", "a patient id ('| patient_id |')"),
])
def test_a_leaking_section_is_refused_by_card_and_push(export, fake_hub, tmp_path, secret_dir, capsys, leak, words):
    out = export(with_eval=False)
    before = _snapshot(out)
    folder = tmp_path / "fid"
    text = FIDELITY + "\n" + leak.format(secret=secret_dir, section=folder.resolve()) + "\n"
    _section_dir(tmp_path, "fid", text)
    with pytest.raises(SystemExit) as exit_:
        hub_cli.main(["card", str(out), "--fidelity_dir", str(folder)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fid/card_section.md would publish ") and words in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="fid/card_section.md would publish"):
        hub.push_to_hub(out, "org/name", fidelity_dir=folder)
    assert "files" not in fake_hub and "repo" not in fake_hub  # nothing was sent
    assert _snapshot(out) == before


def test_a_patient_id_in_any_published_text_is_refused(export):
    out = export(with_eval=False)
    leaky = {"model_card": {"reference": "held-out images of patient #4711", "metrics": {"fd": 1.0}}}
    with pytest.raises(ValueError, match=r"README.md would publish a patient id \(.patient #4711.\)"):
        hub.write_model_card(out, leaky)


def test_the_card_shows_who_trained_it_and_the_subgroup_figures(export):
    demographics = {"patient_sex": {"F": 5, "M": 19}, "age_bin": {"0-17": 1, "18-39": 6, "40-59": 9, "60-79": 8},
                    "view_position": {"AP": 10, "PA": 14}}
    rows = [{"subgroup": "patient_sex=F", "FD": "12.3 [10.1, 14.5]", "flagged": "any finding"},
            {"subgroup": "patient_sex=M", "FD": "9.8 [8.7, 10.9]", "flagged": "no"}]
    out = export(demographics=demographics,
                 eval_metrics={"model_card": {**EVAL["model_card"], "subgroups": rows}})
    card = (out / "README.md").read_text()
    assert "| patient_sex | F | 5 | 20.8% |" in card and "| age_bin | 0-17 | 1 | 4.2% |" in card
    # Under half an even share: F (20.8% of two) and 0-17 (4.2% of five bins), not 18-39 (25%); 80+ has no one.
    assert ("Underrepresented (under half an even share of their group): age_bin=0-17 (4.2%), age_bin=80+ (none), "
            "patient_sex=F (20.8%).") in card.replace("\n", " ")
    assert "| subgroup | FD | flagged |" in card and "| patient_sex=F | 12.3 [10.1, 14.5] | any finding |" in card
    assert "subgroups" not in card.split("### Per subgroup")[0].split("## Evaluation")[1]  # not a settings row
