"""Labels, the conditional pipeline and classifier-free guidance, on tiny random models."""

import csv
import json
import random
import shutil
from collections import Counter

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image

from lunggen_diffusers import LungGenPipeline
from lunggen_diffusers.config import parse_args
from lunggen_diffusers.data.conditioning import (
    condition_vectors,
    label_config,
    prevalence,
)
from lunggen_diffusers.data.phantom import FINDINGS, phantom_dataset
from lunggen_diffusers.generation.output_folder import save_images
from lunggen_diffusers.generation.sampling import generate, load_pipeline
from lunggen_diffusers.lunggen_pipeline import LabelSpace, guided_denoise
from lunggen_diffusers.training import loop
from lunggen_diffusers.training.diffusion import train
from lunggen_diffusers.vocabulary import as_model_names

import pipeline
from fixtures import tiny_pipeline

NIH_LIKE = {"findings": ["Cardiomegaly", "Effusion", "Pleural_Thickening"], "groups": {"view_position": ["AP", "PA"]},
            "combination_counts": {"view_position=PA": 60, "Cardiomegaly|view_position=AP": 30,
                                   "Effusion|Pleural_Thickening|view_position=PA": 10}}


@pytest.fixture(scope="module")
def phantoms():
    return phantom_dataset(40, 32, seed=3, finding_prob=0.4)


def test_label_config_counts_every_combination_and_names_no_one(phantoms):
    config = label_config(phantoms, ["findings"])
    assert config["findings"] == sorted(FINDINGS) and config["groups"] == {}
    assert sum(config["combination_counts"].values()) == 40
    assert "phantom-" not in json.dumps(config)  # counts only: no image or patient identifier is stored
    vectors = condition_vectors(phantoms, config)
    truth = np.array([[row[f] for f in sorted(FINDINGS)] for row in phantoms.with_format(None)], np.float32)
    assert vectors.shape == (40, 5) and (vectors[:, :4] == truth).all() and (vectors[:, 4] == 0).all()
    assert prevalence(config)["cardiomegaly"] == truth[:, sorted(FINDINGS).index("cardiomegaly")].mean()


def test_condition_on_a_column_the_data_lacks_names_the_columns_it_has(phantoms):
    with pytest.raises(ValueError, match=r"view_position.*has: image, patient_id"):
        label_config(phantoms.remove_columns(["view_position"]), ["findings", "view_position"])
    with pytest.raises(ValueError, match="--condition_on findings age: choose findings, optionally with view_position"
                                         ", patient_sex, patient_age and source"):
        parse_args(["--condition_on", "findings", "age"])


def test_age_conditions_through_bins_in_their_natural_order(phantoms):
    config = label_config(phantoms, ["findings", "patient_sex", "patient_age", "view_position"])
    ages = phantoms["patient_age"]
    bins = config["groups"]["patient_age"]
    assert bins == [b for b in ("0-17", "18-39", "40-59", "60-79", "80+") if b in bins] and len(bins) >= 3
    assert config["groups"]["patient_sex"] == ["F", "M"] and config["groups"]["view_position"] == ["AP", "PA"]
    space = LabelSpace(config)
    vectors = condition_vectors(phantoms, config)
    for i in range(len(phantoms)):
        years = ages[i]
        expected = next(b for b in bins if space.patient(age=years) == [f"patient_age={b}"])
        assert vectors[i, space.names.index(f"patient_age={expected}")] == 1
        assert vectors[i, [k for k, n in enumerate(space.names) if n.startswith("patient_age=")]].sum() == 1
    assert space.patient(sex="F", age=70, view="PA") == ["patient_sex=F", "patient_age=60-79", "view_position=PA"]
    assert space.patient(age=39.5) == ["patient_age=18-39"] and space.patient(age=40) == ["patient_age=40-59"]
    with pytest.raises(ValueError, match="patient_sex 'X': this model knows F, M"):
        space.patient(sex="X")
    with pytest.raises(ValueError, match="not trained with --condition_on patient_age"):
        LabelSpace(NIH_LIKE).patient(age=50)


def test_draws_given_a_patient_keep_that_patients_findings():
    counts = {"patient_sex=M": 50, "Cardiomegaly|patient_sex=M": 50, "patient_sex=F": 90,
              "Cardiomegaly|patient_sex=F": 10}
    space = LabelSpace({"findings": ["Cardiomegaly"], "groups": {"patient_sex": ["F", "M"]},
                        "combination_counts": counts})
    rng = random.Random(1)
    women = [space.draw(rng, ["patient_sex=F"]) for _ in range(2000)]
    assert all("patient_sex=F" in w for w in women)
    assert abs(sum("Cardiomegaly" in w for w in women) / 2000 - 0.1) < 0.03  # the women's own rate, not 0.3
    with pytest.raises(ValueError, match="no training image carries patient_sex=O"):
        space.draw(rng, ["patient_sex=O"])


def test_no_finding_is_a_condition_and_the_null_condition_is_distinct():
    space = LabelSpace(NIH_LIKE)
    none, null = space.encode(["No Finding"]), space.encode(None)
    assert space.size == 6 and null.tolist() == [0, 0, 0, 0, 0, 1]
    assert none.tolist() == [0, 0, 0, 0, 1, 0]  # no finding, the most frequent view (PA), not the null entry
    assert space.encode([]).tolist() == none.tolist()
    assert space.canonical(["pleural thickening", "CARDIOMEGALY", "view_position=ap"]) == [
        "Cardiomegaly", "Pleural_Thickening", "view_position=AP"]
    with pytest.raises(ValueError, match=r"unknown label 'Pneumonia'; this model knows: Cardiomegaly, Effusion"):
        space.encode(["Pneumonia"])
    with pytest.raises(ValueError, match="one view_position per image"):
        space.encode(["view_position=AP", "view_position=PA"])


def test_draws_follow_the_stored_joint_distribution():
    space, n = LabelSpace(NIH_LIKE), 4000
    rng = random.Random(0)
    seen = Counter("|".join(space.draw(rng)) for _ in range(n))
    for combination, count in NIH_LIKE["combination_counts"].items():
        p = count / 100
        assert abs(seen[combination] / n - p) < 4 * (p * (1 - p) / n) ** 0.5  # 4 standard errors


class CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.rows = unet, []

    def forward(self, x, t, **kwargs):
        self.rows.append(len(x))
        return self.unet(x, t, **kwargs)


@pytest.mark.parametrize("scale, expected_rows", [(1.0, [2, 2]), (3.0, [4, 4])])
def test_guidance_is_one_batched_forward_and_scale_one_costs_one(scale, expected_rows):
    pipe = tiny_pipeline()
    scheduler = DDPMScheduler(num_train_timesteps=50)
    scheduler.set_timesteps(2)
    labels, null = pipe.encode([["cardiomegaly"], []], 2)
    counter = CountingUNet(pipe.unet)
    guided_denoise(counter, scheduler, torch.randn(2, 1, 16, 16), labels, null, scale)
    assert counter.rows == expected_rows


def test_guidance_combines_conditional_and_unconditional_outputs():
    pipe = tiny_pipeline()
    scheduler = DDPMScheduler(num_train_timesteps=50, clip_sample=False)
    scheduler.set_timesteps(1)
    x, t = torch.randn(1, 1, 16, 16), scheduler.timesteps[0]
    labels, null = pipe.encode([["nodule"]], 1)
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=None, class_labels=labels).sample
        uncond = pipe.unet(x, t, encoder_hidden_states=None, class_labels=null).sample
        expected = scheduler.step(uncond + 2.5 * (cond - uncond), t, x).prev_sample
        got = guided_denoise(pipe.unet, scheduler, x, labels, null, 2.5)
    # Same arithmetic, batched (2 rows) vs alone: a convolution may take another kernel path, hence a tolerance
    # far above fp32 rounding (1e-6 relative) and far below any real difference between conditions.
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the projection does reach the UNet


def test_guidance_interval_guides_only_its_timesteps():
    pipe = tiny_pipeline()
    scheduler = DDPMScheduler(num_train_timesteps=50)
    scheduler.set_timesteps(5)  # timesteps 40, 30, 20, 10, 0
    labels, null = pipe.encode([["cardiomegaly"], []], 2)
    counter = CountingUNet(pipe.unet)
    guided_denoise(counter, scheduler, torch.randn(2, 1, 16, 16), labels, null, 3.0, guidance_interval=(10, 30))
    assert counter.rows == [2, 4, 4, 4, 2]  # unguided steps run the conditional model alone


def test_guidance_rescale_matches_the_conditional_spread():
    pipe = tiny_pipeline()
    scheduler = DDPMScheduler(num_train_timesteps=50, clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(1)  # at t = 49, where the prediction shapes the step
    x, t = torch.randn(1, 1, 16, 16), scheduler.timesteps[0]
    labels, null = pipe.encode([["nodule"]], 1)
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=None, class_labels=labels).sample
        uncond = pipe.unet(x, t, encoder_hidden_states=None, class_labels=null).sample
        guided = uncond + 4.0 * (cond - uncond)
        rescaled = guided * cond.std() / guided.std()  # rescale 1: the guided direction at the conditional spread
        outputs = {phi: guided_denoise(pipe.unet, scheduler, x, labels, null, 4.0, guidance_rescale=phi)
                   for phi in (0.0, 1.0, 0.5)}
        expected = {phi: scheduler.step(phi * rescaled + (1 - phi) * guided, t, x).prev_sample
                    for phi in (0.0, 1.0, 0.5)}
    assert guided.std() > 1.05 * cond.std()  # guidance at 4 did widen it: the test can tell
    for phi in outputs:
        assert torch.allclose(outputs[phi], expected[phi], atol=1e-4), phi
    assert not torch.allclose(outputs[0.0], outputs[1.0], atol=1e-3)


def test_saved_pipeline_loads_with_our_class_and_as_remote_code(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == ["lunggen_pipeline", "LungGenPipeline"]
    assert (tmp_path / "model" / "lunggen_pipeline.py").is_file()
    assert not list((tmp_path / "model").rglob("*.bin"))
    ours = LungGenPipeline.from_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "model")
    remote = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(remote).__name__ == "LungGenPipeline" and type(remote) is not LungGenPipeline
    for loaded in (ours, remote):
        assert loaded.config.label_config == pipe.config.label_config
        images = loaded(findings=[["Cardiomegaly"], []], num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 16, 16, 1)
    a = ours(findings=[["nodule"]], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(1))
    b = remote(findings=[["nodule"]], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(1))
    assert np.array_equal(a.images, b.images)  # the same code and weights on the same machine


def test_bad_requests_are_one_clear_line():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        pipe(findings=[[]], guidance_scale=0.5, num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown label 'Hernia'"):
        pipe(findings=[["Hernia"]], num_inference_steps=1)


# ------------------------------------------------------------------ sampling a conditional model (sampling.py, CLI)


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-cond"
    tiny_pipeline().save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def conditional(conditional_dir):
    return load_pipeline(conditional_dir, device="cpu")[0]


def test_same_image_whatever_the_batch_size_with_guidance(conditional):
    kwargs = {"num_inference_steps": 3, "output_type": "np", "progress": False, "labels_from": "train",
              "guidance_scale": 3.0}
    together = generate(conditional, 4, batch_size=4, **kwargs)
    split = generate(conditional, 4, batch_size=3, **kwargs)
    alone = generate(conditional, 1, start_index=2, batch_size=1, **kwargs)
    # Each image's own arithmetic in batches of other sizes: kernels may split the work differently, so equal
    # to well within 1e-4 (fp32 rounding is ~1e-7 per step), never exactly.
    np.testing.assert_allclose(split, together, atol=1e-4)
    np.testing.assert_allclose(alone[0], together[2], atol=1e-4)
    findings = generate(conditional, 2, findings=["Cardiomegaly"], **{**kwargs, "labels_from": None})
    nothing = generate(conditional, 2, findings=[], **{**kwargs, "labels_from": None})
    assert not np.allclose(findings, nothing, atol=1e-3)  # the request reaches the image


def test_manifest_and_png_chunks_carry_the_labels(conditional, tmp_path):
    rows = save_images(conditional, str(tmp_path / "a"), 3, num_inference_steps=2, findings=["cardiomegaly"],
                       guidance_scale=2.0, model="tiny-cond", progress=False)
    assert [r["labels"] for r in rows] == ["cardiomegaly"] * 3
    with open(tmp_path / "a" / "manifest.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert written[0]["labels"] == "cardiomegaly" and written[0]["guidance_scale"] == "2.0"
    with Image.open(tmp_path / "a" / "image_000001.png") as im:
        assert im.text["labels"] == "cardiomegaly" and im.text["guidance_scale"] == "2.0"
        assert im.text["synthetic"] == "research use only"
    drawn = save_images(conditional, str(tmp_path / "b"), 40, num_inference_steps=1, labels_from="train",
                        model="tiny-cond", progress=False)
    counts = Counter(r["labels"] for r in drawn)
    assert set(counts) <= {"No Finding", "cardiomegaly", "nodule|pleural_effusion"} and counts["No Finding"] > 10
    unconditioned = save_images(conditional, str(tmp_path / "c"), 1, num_inference_steps=1, progress=False)
    assert unconditioned[0]["labels"] == "unconditioned"
    with pytest.raises(ValueError, match="made with request="):  # a resume must ask for the same labels
        save_images(conditional, str(tmp_path / "a"), 4, num_inference_steps=2, findings=["nodule"],
                    guidance_scale=2.0, model="tiny-cond", progress=False)
    assert written[0]["guidance_interval"] == ""  # guided at every step
    with pytest.raises(ValueError, match="made with guidance_interval=''"):  # nor guide at other steps
        save_images(conditional, str(tmp_path / "a"), 4, num_inference_steps=2, findings=["cardiomegaly"],
                    guidance_scale=2.0, guidance_interval=[10, 30], model="tiny-cond", progress=False)
    # ddpm at 2 steps visits timesteps 25 and 0: guiding at 30-49 guides no step, so the image is the unguided one.
    both = {"num_inference_steps": 2, "scheduler": "ddpm", "findings": ["cardiomegaly"], "progress": False}
    banded = save_images(conditional, str(tmp_path / "d"), 1, guidance_scale=4.0, guidance_interval=[30, 49], **both)
    save_images(conditional, str(tmp_path / "e"), 1, guidance_scale=1.0, **both)
    save_images(conditional, str(tmp_path / "f"), 1, guidance_scale=4.0, **both)
    assert banded[0]["guidance_interval"] == "30 49"
    pixels = {}
    for name in "def":
        with Image.open(tmp_path / name / "image_000000.png") as im:
            pixels[name] = np.asarray(im)
            assert im.text.get("guidance_interval", "") == ("30 49" if name == "d" else "")
    assert np.array_equal(pixels["d"], pixels["e"]) and not np.array_equal(pixels["e"], pixels["f"])


def test_conditional_model_loads_from_the_hub_cache_offline(conditional_dir, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--lunggen-test--tiny-cond"
    shutil.copytree(conditional_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    loaded, revision = load_pipeline("lunggen-test/tiny-cond", device="cpu")
    assert isinstance(loaded, LungGenPipeline) and revision == commit
    remote = DiffusionPipeline.from_pretrained("lunggen-test/tiny-cond", trust_remote_code=True)
    assert type(remote).__name__ == "LungGenPipeline"


@pytest.mark.parametrize("extra, message", [
    (["--findings", "Hernia"], "unknown label 'Hernia'; this model knows: cardiomegaly, consolidation, nodule"),
    (["--guidance_scale", "0.5"], "guidance_scale must be >= 1"),
    (["--labels_from", "test"], "--labels_from 'test': choose train"),
    (["--findings", "nodule", "--labels_from", "train"], "give --findings or --labels_from, not both"),
    (["--guidance_interval", "10"], "guidance_interval [10]: give the lowest and highest training timestep"),
    (["--guidance_interval", "10", "50"], "0 <= lowest <= highest <= 49"),
])
def test_cli_bad_conditional_requests(extra, message, conditional_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--model", conditional_dir, "--output_dir", str(tmp_path / "out"), "--num_images", "1",
                       "--num_inference_steps", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


def test_cli_findings_asked_of_an_unconditional_model(tmp_path, capsys):
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "plain")
    for extra, message in ((["--findings", "Cardiomegaly"], "findings were asked of an unconditional model"),
                           (["--guidance_scale", "2"], "--guidance_scale needs a conditional model"),
                           (["--guidance_interval", "82", "579"], "--guidance_interval needs a conditional model")):
        with pytest.raises(SystemExit):
            pipeline.main(["--model", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "out"),
                           "--num_images", "1", "--num_inference_steps", "1", *extra])
        assert message in capsys.readouterr().err


def test_a_finding_by_any_name_of_the_vocabulary_draws_the_same_images():
    """The model's own name, NIH's canonical name and another collection's alias ask for one finding."""
    pipe = tiny_pipeline()
    kwargs = {"num_inference_steps": 2, "output_type": "np", "progress": False}
    own = generate(pipe, 2, findings=["pleural_effusion"], **kwargs)
    for name in ("Effusion", "Pleural Effusion", "pleural-effusion"):
        np.testing.assert_array_equal(generate(pipe, 2, findings=[name], **kwargs), own)
    assert as_model_names(["Effusion", "Hernia", "No Finding"], ["cardiomegaly", "pleural_effusion"]) == \
        ["pleural_effusion", "Hernia", "No Finding"]


def test_cli_findings_are_given_apart_and_the_comma_form_still_works_with_a_note(conditional_dir, tmp_path, capsys):
    labels = {}
    for name, findings in (("apart", ["cardiomegaly", "nodule"]), ("commas", ["cardiomegaly,nodule"])):
        pipeline.main(["--model", conditional_dir, "--output_dir", str(tmp_path / name), "--num_images", "1",
                       "--num_inference_steps", "1", "--findings", *findings])
        with open(tmp_path / name / "manifest.csv", newline="") as f:
            labels[name] = [r["labels"] for r in csv.DictReader(f)]
    assert labels["apart"] == labels["commas"] == ["cardiomegaly|nodule"]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --findings cardiomegaly,nodule: commas are deprecated; give the names apart: --findings "
                     "cardiomegaly nodule"]


def test_cli_no_finding_is_a_request(conditional_dir, tmp_path):
    pipeline.main(["--model", conditional_dir, "--output_dir", str(tmp_path / "out"), "--num_images", "2",
                   "--num_inference_steps", "1", "--findings", "No Finding"])
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["labels"] for r in rows] == ["No Finding", "No Finding"] and rows[0]["request"] == "findings=No Finding"


# ------------------------------------------------------------------ conditional training on the spine


def test_conditional_training_exports_a_lunggen_pipeline_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    kwargs = {"condition_on": ["findings"], "phantom_finding_prob": 0.4, "max_train_steps": 4,
              "checkpointing_steps": 2, "condition_dropout": 0.5}
    straight = train(tiny_config(output_dir=str(tmp_path / "a"), **kwargs))
    out = straight.output_dir
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["lunggen_pipeline", "LungGenPipeline"] and (out / "lunggen_pipeline.py").is_file()
    stored = index["label_config"]
    assert stored["findings"] == sorted(FINDINGS) and sum(stored["combination_counts"].values()) == 24
    assert stored["guidance_scale"] == 2.0 and "phantom-" not in json.dumps(index)
    pipe = LungGenPipeline.from_pretrained(out)
    assert pipe(findings=[["Nodule"]], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 1)
    assert Image.open(out / "samples.png").size == (64, 160)  # 5 rows (No Finding + 4 findings) of 2 seeds

    real_save = loop.save_checkpoint

    def save_then_die(accelerator, config, step):
        path = real_save(accelerator, config, step)
        if step == 2:
            raise KeyboardInterrupt  # killed right after checkpoint-2 landed
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(output_dir=str(tmp_path / "b"), **kwargs))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = train(tiny_config(output_dir=str(tmp_path / "b"), resume_from_checkpoint="latest", **kwargs))
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # one machine against itself: bit for bit


def test_condition_dropout_shows_the_null_condition(tiny_config, monkeypatch):
    seen = []
    real_forward = UNet2DConditionModel.forward

    def record(self, sample, timestep, *args, class_labels=None, **kwargs):
        if self.training:
            seen.append(class_labels.clone())
        return real_forward(self, sample, timestep, *args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", record)
    train(tiny_config(condition_on=["findings"], max_train_steps=6, condition_dropout=0.5, checkpointing_steps=6))
    labels = torch.cat(seen)
    null = labels[:, -1] == 1
    assert (labels[null, :-1] == 0).all() and (labels[~null, -1] == 0).all()  # null rows are null only
    assert 0.2 < null.float().mean() < 0.8  # about half of 24 rows, well inside a binomial's 4 sigma


PATIENT_LABELS = {"condition_on": ["findings", "patient_sex", "patient_age", "view_position"],
                  "findings": ["cardiomegaly"],
                  "groups": {"patient_sex": ["F", "M"], "patient_age": ["18-39", "60-79"],
                             "view_position": ["AP", "PA"]},
                  "combination_counts": {"patient_age=18-39|patient_sex=M|view_position=PA": 6,
                                         "cardiomegaly|patient_age=60-79|patient_sex=F|view_position=AP": 4},
                  "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def patient_dir(tmp_path_factory):
    pipe = tiny_pipeline(LabelSpace(PATIENT_LABELS).size, PATIENT_LABELS)
    path = tmp_path_factory.mktemp("models") / "tiny-patient"
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


def test_the_patient_asked_for_reaches_the_condition_and_the_manifest(patient_dir, tmp_path):
    pipe = load_pipeline(patient_dir, device="cpu")[0]
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "np"}
    woman = pipe(findings=[[]], sex="F", age=70, view="AP", **kwargs).images
    explicit = pipe(findings=[["patient_sex=F", "patient_age=60-79", "view_position=AP"]],
                    **{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    man = pipe(findings=[[]], sex="M", age=25, view="PA", **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    np.testing.assert_array_equal(woman, explicit)
    assert not np.allclose(woman, man.images, atol=1e-4)
    with pytest.raises(ValueError, match=r"age 50 falls in no age bin this model was trained on \(it knows: 18-39"):
        pipe(findings=[[]], age=50, num_inference_steps=1)
    with pytest.raises(ValueError, match="sex, age and view need findings"):
        pipe(sex="F", num_inference_steps=1)
    rows = save_images(pipe, str(tmp_path / "drawn"), 12, num_inference_steps=1, labels_from="train",
                       patient={"sex": "F"}, model="tiny-patient", progress=False)
    # Draws restricted to the training combinations of women: their findings and ages come along.
    assert {r["labels"] for r in rows} == {"cardiomegaly|patient_age=60-79|patient_sex=F|view_position=AP"}


def test_cli_patient_options(patient_dir, tmp_path, capsys):
    pipeline.main(["--model", patient_dir, "--output_dir", str(tmp_path / "out"), "--num_images", "2",
                   "--num_inference_steps", "1", "--findings", "No Finding", "--sex", "M", "--age", "30"])
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        assert {row["labels"] for row in csv.DictReader(f)} == {"patient_age=18-39|patient_sex=M|view_position=PA"}
    with pytest.raises(SystemExit):
        pipeline.main(["--model", patient_dir, "--output_dir", str(tmp_path / "bad"), "--num_images", "1",
                       "--sex", "F"])
    assert "--sex F needs --findings or --labels_from" in capsys.readouterr().err


def test_the_vector_layout_survives_saving_whatever_the_condition_order(phantoms, tmp_path):
    """Trained with --condition_on findings view_position patient_sex; the saved config.json sorts its keys."""
    config = label_config(phantoms, ["findings", "view_position", "patient_sex"])
    vectors = condition_vectors(phantoms, config)
    pipe = tiny_pipeline(LabelSpace(config).size, config)
    pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "m"), device="cpu")[0]
    for i, row in enumerate(phantoms):  # rows of both sexes and both views
        asked = [f for f in FINDINGS if row[f]] + [f"view_position={row['view_position']}",
                                                   f"patient_sex={row['patient_sex']}"]
        np.testing.assert_array_equal(loaded.labels.encode(asked).numpy(), vectors[i])
