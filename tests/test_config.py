"""Configuration: presets, files and flags in the right order, one clear error for each bad value."""

import json
from pathlib import Path

import pytest
import yaml

from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.config import (
    from_dict,
    load_config,
    parse_args,
    preset_names,
    preset_values,
    save_config,
)
from lunggen_diffusers.training.model import build_unet

REPO = Path(__file__).resolve().parents[1]


def test_no_arguments_is_the_demo():
    config = parse_args([])
    assert config.preset == "demo" and config.data.resolution == 64 and config.training.use_ema
    assert config.data.dataset_name is None and config.data.train_data_dir is None  # the built-in phantom


PRESET_FILES = sorted((REPO / "lunggen_diffusers" / "presets").glob("*.yaml"))


def test_the_shipped_presets():
    assert preset_names() == sorted(p.stem for p in PRESET_FILES) == ["demo", "demo-latent", "demo-text",
                                                                         "lunggen-1024-latent", "lunggen-256",
                                                                         "lunggen-512-latent"]


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("conditioned", [[], ["--condition_on", "findings"]], ids=["plain", "conditioned"])
def test_every_preset_file_is_what_its_preset_flag_gives(path, conditioned):
    by_file = parse_args(["--config", str(path), *conditioned]).to_dict()
    assert by_file == parse_args(["--preset", path.stem, *conditioned]).to_dict()
    assert by_file["preset"] == path.stem
    # and the preset really sets what its file says (no key is silently dropped on the way)
    values = yaml.safe_load(path.read_text())
    overlay = values.pop("when_conditioned", {}) if conditioned else {}
    values.pop("when_conditioned", None)
    if conditioned:  # the flag's own value wins over a preset's (demo-text's report)
        values.pop("condition_on", None)
    assert {k: by_file[k] for k in {**values, **overlay}} == {**values, **overlay}


def test_the_demo_presets_values_are_the_documented_recipe():
    demo, conditional = parse_args([]), parse_args(["--condition_on", "findings"])
    assert (demo.data.resolution, demo.model.block_out_channels, demo.model.prediction_type) == \
        (64, [16, 32, 64, 128], "v_prediction")
    assert (demo.training.max_train_steps, demo.training.train_batch_size, demo.training.learning_rate) == \
        (1200, 8, 2e-3)
    assert (conditional.training.max_train_steps, conditional.data.phantom_finding_prob) == (4500, 0.5)
    # zero terminal SNR for the unconditional demo only: the conditional demo's tables were measured without it
    assert (demo.model.rescale_betas_zero_snr, conditional.model.rescale_betas_zero_snr) == (True, False)
    epsilon = parse_args(["--prediction_type", "epsilon", "--rescale_betas_zero_snr", "false"])
    assert not epsilon.model.rescale_betas_zero_snr


def test_conditioning_applies_the_conditional_preset_under_the_flags(tmp_path):
    plain, conditional = parse_args([]), parse_args(["--condition_on", "findings"])
    assert (plain.data.phantom_finding_prob, plain.training.max_train_steps) == (0.1, 1200)
    assert (conditional.data.phantom_finding_prob, conditional.training.max_train_steps) == (0.5, 4500)
    assert (plain.training.snr_gamma, conditional.training.snr_gamma) == (5.0, None)  # None overrides, not ignored
    assert conditional.model.prediction_type == plain.model.prediction_type  # the rest of the demo preset stays
    flagged = parse_args(["--condition_on", "findings", "--max_train_steps", "7", "--phantom_finding_prob", "0.2"])
    assert (flagged.data.phantom_finding_prob, flagged.training.max_train_steps) == (0.2, 7)
    save_config(flagged, tmp_path / "training_config.json")  # a saved run keeps its own values, not the preset's
    assert load_config(tmp_path / "training_config.json").to_dict() == flagged.to_dict()


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: lunggen-256\nlearning_rate: 0.0003\ntrain_batch_size: 8\n")
    config = parse_args(["--config", str(path), "--train_batch_size", "4"])
    assert config.model.block_out_channels == preset_values("lunggen-256")["block_out_channels"]  # preset
    assert config.training.learning_rate == 3e-4  # file over preset
    assert config.training.train_batch_size == 4  # flag over file


def test_saved_config_round_trips_and_never_holds_the_token(tmp_path):
    config = parse_args(["--preset", "lunggen-256", "--hub_token", "hf_secret", "--snr_gamma", "5"])
    save_config(config, tmp_path / "training_config.json")
    assert "hf_secret" not in (tmp_path / "training_config.json").read_text()
    again = load_config(tmp_path / "training_config.json")
    assert again.to_dict() == config.to_dict()
    assert parse_args(["--config", str(tmp_path / "training_config.json")]).to_dict() == config.to_dict()


def test_paper_preset_builds_the_paper_unet():
    unet = build_unet(parse_args(["--preset", "lunggen-256"]))
    assert unet.config.in_channels == unet.config.out_channels == 1 and unet.config.sample_size == 256
    assert unet.config.block_out_channels == (128, 128, 256, 256, 512, 512) and unet.config.layers_per_block == 2
    # Attention exactly at the 16x16 level: 256 / 2**4.
    assert [b.startswith("Attn") for b in unet.config.down_block_types] == [False, False, False, False, True, False]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--preset", "big"], "--preset 'big' is not one of: demo, demo-latent, demo-text, lunggen-1024-latent, lunggen-256, "
                                 "lunggen-512-latent"),
        (["--resolution", "60"], "--resolution 60 cannot be divided down"),
        (["--norm_num_groups", "7"], "--norm_num_groups 7 does not divide"),
        (["--train_batch_size", "0"], "--train_batch_size 0 must be a positive integer"),
        (["--push_to_hub", "true"], "--push_to_hub needs --hub_model_id"),
        (["--dataset_name", "a", "--train_data_dir", "b"], "either --dataset_name or --train_data_dir"),
        (["--dicom_percentiles", "99", "1"], "--dicom_percentiles 99.0 1.0: give two percentiles, low < high"),
        (["--rescale_betas_zero_snr", "true", "--prediction_type", "epsilon"],
         "--rescale_betas_zero_snr needs --prediction_type v_prediction, not 'epsilon'"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
    ],
)
def test_bad_values_are_named(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


@pytest.mark.parametrize("name, value, allowed", [("mixed_precision", "fp8", "no, fp16, bf16"),
                                                  ("view_position", "LL", "PA, AP, all"),
                                                  ("source", "nihh", "auto, nih, mimic")])
def test_choices_come_from_the_literal_types_on_the_command_line_and_in_a_config_file(name, value, allowed, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args([f"--{name}", value])
    assert exit_.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err
    with pytest.raises(UsageError, match=f"--{name} '{value}' is not one of: {allowed}"):
        from_dict({name: value})


def test_an_unknown_flag_is_argparses_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--no_such_flag", "1"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --no_such_flag 1" in capsys.readouterr().err


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"random_flip": True}))
    with pytest.raises(ValueError, match="unknown option\\(s\\) random_flip"):
        parse_args(["--config", str(path)])
