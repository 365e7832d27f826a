"""Counterfactual editing (#43): every method on pixel and latent conditional models, the keep mask exact, the auto
mask, and `lunggen-edit`'s files, marks and one-line refusals."""

import csv
import functools
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from lunggen_diffusers.data.phantom import draw_phantom
from lunggen_diffusers.generation import editing
from lunggen_diffusers.generation.edit import main as edit_main
from lunggen_diffusers.generation.editing import (
    METHODS,
    Editor,
    _strongest_region,
    adds_one_focal_site,
    auto_mask,
    edit,
    from_model,
    reads_target,
    to_model,
)
from lunggen_diffusers.hub import push_dataset
from lunggen_diffusers.lunggen_pipeline import LungGenPipeline, predicted_original
from lunggen_diffusers.reader_study.study import synthetic_pool

from dicom_files import chest
from fixtures import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
SOURCE, TARGET = [[], ["cardiomegaly"]], [["cardiomegaly"], []]
edit_pt = functools.partial(edit, output_type="pt")  # tensors in, tensors out


def _latent_pipeline():
    pipe = tiny_pipeline()
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), norm_num_groups=8,
                        latent_channels=1, mid_block_add_attention=False).eval()
    return LungGenPipeline(unet=pipe.unet, scheduler=pipe.scheduler, vae=vae, label_config=pipe.config.label_config)


@pytest.fixture(scope="module", params=["pixel", "latent"])
def pipe(request):
    return tiny_pipeline() if request.param == "pixel" else _latent_pipeline()


def _images(pipe):
    side = 16 * (2 if getattr(pipe, "vae", None) is not None else 1)
    return torch.from_numpy(np.stack([draw_phantom(0, i, 32, 0.0)[0] for i in range(2)]).astype(np.float32) / 255)[
        :, None, :side, :side], side


@pytest.mark.parametrize("method", METHODS)
def test_every_method_edits_toward_the_target_reproducibly(pipe, method):
    images, side = _images(pipe)
    mask = torch.zeros(2, 1, side, side)
    mask[..., side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
    run = lambda target, seed=0: edit_pt(pipe, images, SOURCE, target, method, None, 2.0, 8, mask,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    out = run(TARGET)
    assert out.shape == images.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, run(TARGET))  # the same generator, the same edit
    inside = mask.bool()
    assert (out - images).abs()[inside].mean() > 1e-3  # it edits inside the mask
    assert not torch.equal(out, run(SOURCE))  # and the target labels steer it
    # Outside the mask the source is re-imposed at every step and pasted at the end: exactly the source's pixels.
    assert torch.equal(out[~inside.expand_as(out)], images[~inside.expand_as(images)])


def test_a_keep_mask_keeps_its_pixels_exactly_and_without_any_mask_the_whole_image_may_change(pipe):
    images, side = _images(pipe)
    keep = torch.zeros(2, 1, side, side)
    keep[..., :, : side // 2] = 1
    out = edit_pt(pipe, images, SOURCE, TARGET, "sdedit", 0.8, 2.0, 8, keep_mask_image=keep,
               generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., : side // 2], images[..., : side // 2])
    free = edit_pt(pipe, images, SOURCE, TARGET, "sdedit", 0.8, 2.0, 8, generator=torch.Generator().manual_seed(0))
    assert (free - images)[..., : side // 2].abs().mean() > 1e-3


def test_ddim_inversion_to_the_same_labels_gives_the_image_back():
    pipe = tiny_pipeline()
    images, _ = _images(pipe)
    out = edit_pt(pipe, images, SOURCE, SOURCE, "ddim-inversion", 0.3, 1.0, 50)
    assert (out - images).abs().mean() < 0.01  # the deterministic trajectory runs back to where it started
    noisy = edit_pt(pipe, images, SOURCE, SOURCE, "sdedit", 0.3, 1.0, 50, generator=torch.Generator().manual_seed(0))
    assert (noisy - images).abs().mean() > 3 * (out - images).abs().mean()


def test_ddpm_inversion_to_the_same_labels_gives_the_image_back_at_any_guidance(pipe):
    images, _ = _images(pipe)
    latent = getattr(pipe, "vae", None) is not None
    # A latent model's image can only come back as its autoencoder's reconstruction of it.
    expected = from_model(pipe, to_model(pipe, images)) if latent else images
    for scale in (1.0, 3.0):  # guidance is measured from the source labels: to the same labels it adds nothing
        out = edit_pt(pipe, images, SOURCE, SOURCE, "ddpm-inversion", 0.8, scale, 8,
                   generator=torch.Generator().manual_seed(0))
        assert (out - expected).abs().max() < 1e-4
    # Its noise maps are drawn from the generator: another seed, another edit of the same image.
    run = lambda seed: edit_pt(pipe, images, SOURCE, TARGET, "ddpm-inversion", 0.8, 2.0, 8,  # noqa: E731
                            generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(run(0), run(1))
    with pytest.raises(ValueError, match="eta 1.0: ddpm-inversion's noise is the source's own"):
        edit_pt(pipe, images, SOURCE, TARGET, "ddpm-inversion", eta=1.0)


def test_eta_puts_fresh_noise_back_reproducibly_and_zero_is_deterministic_ddim(pipe):
    images, _ = _images(pipe)
    run = lambda eta, seed: edit_pt(pipe, images, SOURCE, TARGET, "ddim-inversion", 0.8, 2.0, 8, eta=eta,  # noqa: E731
                                 generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0.0, 0), run(0.0, 1))  # DDIM's own steps: the generator plays no part
    assert torch.equal(run(1.0, 0), run(1.0, 0))
    assert not torch.equal(run(1.0, 0), run(1.0, 1))


@pytest.mark.parametrize("spacing, grid", [("leading", [20, 15, 10, 5, 0]), ("trailing", [24, 19, 14, 9, 4])])
def test_an_edit_runs_on_the_models_own_timestep_grid(spacing, grid):
    """The edit takes the last `strength` of the model's own schedule, as its scheduler spaces it: a zero-terminal-SNR
    model is stored with trailing spacing, and its strength-1 edit starts at the last timestep, pure noise."""
    pipe = tiny_pipeline()  # 50 training timesteps
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    assert Editor(pipe, SOURCE, TARGET, 2.0, 10, 0.5).timesteps.tolist() == grid
    assert Editor(pipe, SOURCE, TARGET, 2.0, 10, 1.0).timesteps[0] == (49 if spacing == "trailing" else 45)


def test_the_last_step_lands_on_the_clean_image():
    editor = Editor(tiny_pipeline(), SOURCE, TARGET, 2.0, 10, 1.0)
    x, output = (torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(k)) for k in (0, 1))
    last = editor.timesteps[-1]
    clean = predicted_original(editor.scheduler, output, x, last).clamp(-1, 1)
    for eta in (0.0, 1.0):
        assert torch.allclose(editor.step(output, last, x, eta, torch.Generator().manual_seed(2)), clean, atol=1e-6)


def test_the_auto_mask_marks_where_the_labels_disagree_and_nothing_when_they_agree(pipe):
    images, side = _images(pipe)
    mask = auto_mask(pipe, images, SOURCE, TARGET, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (2, 1, side, side) and set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    none = auto_mask(pipe, images, SOURCE, SOURCE, generator=torch.Generator().manual_seed(0))
    assert none.sum() == 0
    # An edit confined to an empty mask is the source itself.
    assert torch.equal(edit_pt(pipe, images, SOURCE, TARGET, "ddim-inversion", 0.5, 2.0, 8, none), images)


def test_the_strongest_region_is_the_connected_one_holding_the_most_difference():
    mask, weight = torch.zeros(12, 12), torch.ones(12, 12)
    mask[1:3, 1:3] = 1  # 4 pixels, each of weight 5
    weight[1:3, 1:3] = 5
    mask[6:11, 6:9] = 1  # 15 pixels of weight 1, with a diagonal neighbour: one region of 16
    mask[11, 9] = 1
    mask[0, 11] = 1  # a lone pixel
    strongest = _strongest_region(mask, weight)
    assert strongest.sum() == 4 and strongest[1:3, 1:3].all()
    strongest = _strongest_region(mask, torch.ones(12, 12))
    assert strongest.sum() == 16 and strongest[11, 9] == 1 and strongest[0, 11] == 0
    assert _strongest_region(torch.zeros(5, 5), torch.ones(5, 5)).sum() == 0


def test_the_auto_mask_keeps_one_site_for_focal_additions_only(pipe):
    images, _ = _images(pipe)
    draw = lambda source, target, one_site=None: auto_mask(  # noqa: E731
        pipe, images, source, target, generator=torch.Generator().manual_seed(0), one_site=one_site)
    add_nodule = ([[], ["cardiomegaly"]], [["nodule"], ["cardiomegaly", "nodule"]])
    one, every = draw(*add_nodule, one_site=True), draw(*add_nodule, one_site=False)
    assert torch.equal(draw(*add_nodule), one) and (one <= every).all() and one.sum() > 0
    # The one site has no margin: grown by the 1-pixel margin (at this size), it still lies inside the all-sites mask.
    assert (F.max_pool2d(one, 3, stride=1, padding=1) <= every).all()
    for source, target in (([[], []], [["pleural_effusion"]] * 2),  # effusion is often on both sides
                           ([["nodule"]] * 2, [[], []]),  # a removal, wherever the finding is
                           ([["cardiomegaly"]] * 2, [["nodule"]] * 2)):  # adds a nodule but removes another
        assert torch.equal(draw(source, target), draw(source, target, one_site=False))
    assert adds_one_focal_site([], ["Consolidation"]) and adds_one_focal_site(["Effusion"], ["Effusion", "Mass"])
    assert not adds_one_focal_site([], ["Effusion", "Nodule"]) and not adds_one_focal_site(["Nodule"], [])


def test_edit_takes_and_gives_images_as_diffusers_pipelines_do(pipe):
    images, side = _images(pipe)
    mask = torch.zeros(2, 1, side, side)
    mask[..., side // 4: 3 * side // 4, :] = 1
    run = lambda image, mask_image, output_type: edit(  # noqa: E731
        pipe, image, SOURCE, TARGET, "ddpm-inversion", 0.8, 2.0, 8, mask_image,
        generator=torch.Generator().manual_seed(0), output_type=output_type)
    expected = run(images, mask, "pt")
    # PIL in (an RGB image made grey, as diffusers' image processor does) and PIL out: grey images of the same size.
    pil = [Image.fromarray(np.round(image[0].numpy() * 255).astype(np.uint8)) for image in images]
    pil_masks = [Image.fromarray((m[0].numpy() * 255).astype(np.uint8)) for m in mask]
    out = run([pil[0].convert("RGB"), pil[1]], pil_masks, "pil")
    assert [(o.mode, o.size) for o in out] == [("L", (side, side))] * 2
    # The same pixels whatever form they came in (the PNGs' 8-bit rounding aside).
    assert np.abs(np.asarray(out[0], np.float32) / 255 - expected[0, 0].numpy()).max() <= 1 / 255 + 1e-6
    as_np = run(images.numpy().transpose(0, 2, 3, 1), mask.numpy().transpose(0, 2, 3, 1), "np")
    assert as_np.shape == (2, side, side, 1) and np.allclose(as_np[..., 0], expected[:, 0].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="output_type 'latent': one of pil, np, pt"):
        run(images, mask, "latent")


def test_bad_edit_arguments_are_value_errors_naming_them():
    pipe = tiny_pipeline()
    images, _ = _images(pipe)
    with pytest.raises(ValueError, match="unknown editing method 'blend'"):
        edit_pt(pipe, images, SOURCE, TARGET, "blend")
    with pytest.raises(ValueError, match=r"strength 1.5"):
        edit_pt(pipe, images, SOURCE, TARGET, strength=1.5)
    with pytest.raises(ValueError, match=r"eta -0.5: give 0"):
        edit_pt(pipe, images, SOURCE, TARGET, eta=-0.5)
    with pytest.raises(ValueError, match="repaint regenerates inside a mask"):
        edit_pt(pipe, images, SOURCE, TARGET, "repaint")


class Oracle(torch.nn.Module):
    """A denoiser that knows the clean images `x0`: given cardiomegaly among its labels it predicts the noise exactly,
    without it, none."""

    def __init__(self, x0, alphas, column):
        super().__init__()
        self.x0, self.alphas, self.column = x0, alphas, column
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, x, t, encoder_hidden_states=None, class_labels=None):
        a = self.alphas[t].view(-1, 1, 1, 1)
        exact = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return SimpleNamespace(sample=class_labels[:, self.column].view(-1, 1, 1, 1) * exact)


def test_the_model_reads_an_image_as_the_labels_under_which_it_predicts_the_noise_better():
    tiny = tiny_pipeline()
    images, side = _images(tiny)
    column = tiny.labels.names.index(tiny.labels.canonical(["cardiomegaly"])[0])
    oracle = Oracle(to_model(tiny, images), tiny.scheduler.alphas_cumprod.float(), column)
    pipe = SimpleNamespace(unet=oracle, scheduler=tiny.scheduler, encode=tiny.encode)
    read = lambda source, target, region=None: reads_target(  # noqa: E731
        pipe, images, source, target, region, generator=torch.Generator().manual_seed(0)).tolist()
    with_it, without = [["cardiomegaly"]] * 2, [[]] * 2
    assert read(without, with_it) == [True, True]  # the target's labels explain the noise: an addition taken
    assert read(with_it, without) == [False, False]  # a removal the image does not show: not taken
    assert read(with_it, with_it) == [False, False]  # the same labels both ways: read as neither
    assert read(without, with_it, torch.zeros(2, 1, side, side)) == [False, False]  # nothing counted


def test_an_edit_the_model_reads_as_its_source_is_taken_again_with_the_same_noise_at_higher_guidance(monkeypatch):
    pipe = tiny_pipeline()
    images, side = _images(pipe)
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 4: 3 * side // 4, :] = 1  # one mask for both images
    run = lambda images, source, target, scale=2.0, rise=1.0: edit_pt(  # noqa: E731
        pipe, images, source, target, "ddpm-inversion", 0.8, scale, 8, mask, generator=torch.Generator().manual_seed(0),
        guidance_rise=rise, return_guidance=True)
    calls = []
    monkeypatch.setattr(editing, "reads_target", lambda pipe, image, source, target, region, generator: (
        calls.append((len(image), region.sum().item())) or torch.tensor([False] * len(image))))
    # Read as the source every time: raised by 0.5 at a time, to 2 + 1; the image with nothing to change never.
    out, scales = run(images, [[], ["cardiomegaly"]], [["cardiomegaly"], ["cardiomegaly"]])
    assert scales == [3.0, 2.0] and calls == [(1, mask.sum().item())] * 2  # read inside the mask only
    alone, (scale,) = run(images[:1], [[]], [["cardiomegaly"]], 3.0, 0.0)
    assert scale == 3.0 and torch.equal(out[:1], alone)  # what an edit at 3 gives, the same noise
    first, _ = run(images, [[], ["cardiomegaly"]], [["cardiomegaly"], ["cardiomegaly"]], rise=0.0)
    assert torch.equal(out[1:], first[1:]) and not torch.equal(out[:1], first[:1])
    calls.clear()
    assert run(images, [[], []], [["cardiomegaly"]] * 2, rise=0.4)[1] == [2.0, 2.0] and not calls  # under a step
    monkeypatch.setattr(editing, "reads_target", lambda pipe, image, *args, **kwargs: torch.tensor([True] * len(image)))
    again, scales = run(images, [[], []], [["cardiomegaly"]] * 2)
    assert scales == [2.0, 2.0] and torch.equal(again, run(images, [[], []], [["cardiomegaly"]] * 2, rise=0.0)[0])
    with pytest.raises(ValueError, match=r"guidance_rise -1.0: give 0 \(never\) or more"):
        run(images, [[]] * 2, [["cardiomegaly"]] * 2, rise=-1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit-models")
    tiny_pipeline().save_pretrained(root / "conditional")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(root / "plain")
    return root


def _phantom(index, side):
    return np.asarray(Image.fromarray(draw_phantom(0, index, 32, 0.0)[0]).resize((side, side), Image.LANCZOS))


def _inputs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(_phantom(0, 16)).save(folder / "patient_0001.png")
    Image.fromarray(_phantom(1, 32)).save(folder / "patient_0002_big.png")  # resized, with a warning
    Image.fromarray(np.stack([_phantom(2, 16)] * 3, -1)).save(folder / "colour.png")  # converted to grey
    return folder


def test_lunggen_edit_writes_marked_edits_named_by_hash_and_a_manifest_without_names(models, tmp_path, capsys,
                                                                                     caplog):
    folder = _inputs(tmp_path)
    out = tmp_path / "edits"
    edit_main(["--model", str(models / "conditional"), "--input", str(folder), "--add", "Cardiomegaly", "--mask",
               "auto", "--num_inference_steps", "8", "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert "3 edited image(s)" in captured.out and "keep them local" in captured.out
    assert "an input of 32x32 was resized to the model's 16x16" in caplog.text
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir())
    assert sorted(r["source_sha256"] for r in rows) == digests
    text = (out / "manifest.csv").read_text()
    assert "patient_000" not in text and "colour" not in text and str(folder) not in text
    row = rows[0]
    assert row["source"] == "No Finding" and row["target"] == "cardiomegaly" and row["method"] == "ddpm-inversion"
    assert row["mask"] == "auto (all sites)" and row["model"] == "conditional" and row["eta"] == "0.0"
    # The guidance each image was edited at: the model's 2, raised by 0.5 where it read the edit as its source.
    assert row["guidance_rise"] == "1.0" and {r["guidance_scale"] for r in rows} <= {"2.0", "2.5", "3.0"}
    for r in rows:
        stem = r["source_sha256"][:12]
        assert {f"edit_{stem}.png", f"difference_{stem}.png", f"grid_{stem}.png"} <= {p.name for p in out.iterdir()}
        with Image.open(out / r["file"]) as edited:
            assert edited.mode == "L" and edited.size == (16, 16)
            assert edited.text["derived_from_real"] == f"sha256:{r['source_sha256']}"
            assert "synthetic" not in edited.text and "not synthetic" in edited.text["Description"]
        with Image.open(out / f"grid_{stem}.png") as grid:
            assert grid.size == (4 * 16, 16)  # source | edited | difference | mask
    # Patient data is refused wherever images are called synthetic or published.
    with pytest.raises(ValueError, match="made from a real image"):
        push_dataset(out, "org/edits")
    with pytest.raises(ValueError, match="edited from a real patient's radiograph"):
        synthetic_pool(str(out))


@pytest.mark.parametrize("model, extra, words", [
    ("plain", ["--add", "Cardiomegaly"], "trained without labels"),
    ("conditional", ["--add", "Fracture"], "Fracture"),
    ("conditional", [], "give --add or --remove"),
    ("conditional", ["--add", "Cardiomegaly", "--remove", "Cardiomegaly"], "both added and removed"),
    ("conditional", ["--add", "Cardiomegaly", "--mask", "{mask}"], "give a mask of the images' size (16x16)"),
    ("conditional", ["--add", "Nodule", "--mask_sites", "one"], "--mask_sites one chooses among the auto mask's"),
    ("conditional", ["--add", "Nodule", "--guidance_rise", "-1"], "guidance_rise -1.0: give 0 (never) or more"),
])
def test_lunggen_edit_refuses_in_one_line(models, tmp_path, capsys, model, extra, words):
    folder = _inputs(tmp_path)
    Image.new("L", (20, 20), 255).save(tmp_path / "mask.png")
    argv = ["--model", str(models / model), "--input", str(folder), "--output_dir", str(tmp_path / "out"),
            *[a.format(mask=tmp_path / "mask.png") for a in extra]]
    with pytest.raises(SystemExit) as exit_info:
        edit_main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out" / "manifest.csv").exists()


@pytest.mark.parametrize("extra, value", [(["--method", "blend"], "blend"), (["--mask_sites", "two"], "two")])
def test_lunggen_edit_offers_its_choices_to_argparse(models, tmp_path, capsys, extra, value):
    with pytest.raises(SystemExit) as exit_info:
        edit_main(["--model", str(models / "conditional"), "--input", str(tmp_path), "--output_dir", str(tmp_path),
                   "--add", "Nodule", *extra])
    assert exit_info.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, cell", [([], "auto (one site)"), (["--mask_sites", "all"], "auto (all sites)")])
def test_lunggen_edit_records_how_many_sites_an_auto_mask_kept(models, tmp_path, extra, cell):
    Image.fromarray(_phantom(0, 16)).save(tmp_path / "cxr.png")
    edit_main(["--model", str(models / "conditional"), "--input", str(tmp_path / "cxr.png"), "--add", "Nodule",
               "--mask", "auto", "--num_inference_steps", "4", "--output_dir", str(tmp_path / "out"), *extra])
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["mask"] == cell


def test_lunggen_edit_takes_a_finding_by_any_name_and_the_old_comma_form_with_a_note(models, tmp_path, capsys):
    """NIH's "Effusion" and CheXpert's "Pleural Effusion" reach a model trained on the phantom's "pleural_effusion";
    "A,B" still works, with one note line."""
    Image.fromarray(_phantom(0, 16)).save(tmp_path / "cxr.png")
    common = ["--model", str(models / "conditional"), "--input", str(tmp_path / "cxr.png"), "--method", "sdedit",
              "--num_inference_steps", "2", "--guidance_rise", "0"]
    targets = {}
    for k, extra in enumerate((["--add", "Effusion", "Nodule"], ["--add", "Pleural Effusion,nodule"])):
        edit_main([*common, *extra, "--output_dir", str(tmp_path / f"out{k}")])
        with open(tmp_path / f"out{k}" / "manifest.csv", newline="") as f:
            (row,) = csv.DictReader(f)
        targets[k] = row["target"]
    assert targets == {0: "nodule|pleural_effusion", 1: "nodule|pleural_effusion"}
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ['note: --add Pleural Effusion,nodule: commas are deprecated; give the names apart: --add '
                     '"Pleural Effusion" nodule']


def test_an_edit_of_a_dicom_file_reads_its_grey_pipeline(models, tmp_path):
    path = chest(tmp_path / "study.dcm")
    edit_main(["--model", str(models / "conditional"), "--input", str(path), "--remove", "Cardiomegaly",
               "--method", "sdedit", "--num_inference_steps", "6", "--output_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["source"] == "cardiomegaly" and rows[0]["target"] == "No Finding"
    assert rows[0]["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "study" not in json.dumps(rows) and "P-001" not in json.dumps(rows)


def test_lunggen_edit_passes_eta_on_and_records_it(models, tmp_path):
    Image.fromarray(_phantom(0, 16)).save(tmp_path / "cxr.png")
    outputs = {}
    for eta in ("0", "1"):
        out = tmp_path / f"eta{eta}"
        edit_main(["--model", str(models / "conditional"), "--input", str(tmp_path / "cxr.png"), "--add",
                   "Cardiomegaly", "--method", "ddim-inversion", "--eta", eta, "--num_inference_steps", "8",
                   "--output_dir", str(out)])
        with open(out / "manifest.csv", newline="") as f:
            (row,) = csv.DictReader(f)
        with Image.open(out / row["file"]) as edited:
            assert row["eta"] == edited.text["edit_eta"] == f"{float(eta)}"
            outputs[eta] = np.asarray(edited)
    assert not np.array_equal(outputs["0"], outputs["1"])  # the fresh noise reached the edit
