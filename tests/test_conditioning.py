"""Conditions as the UNet takes them: statistics and vocabularies from the training split, MONAI's context and class
embeddings, the null condition, guidance, and label maps as the ControlNet's input."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from monai_diffusion.conditioning import (
    ConditionEncoder,
    Conditioning,
    Denoiser,
    control_input,
    control_size,
    parse_condition_args,
    read_condition_table,
)
from monai_diffusion.config import config_from_dict
from monai_diffusion.networks.builders import build_unet

ITEMS = [{"image": f"/d/v{i}.nii.gz", "age": age, "sex": sex, "site": site}
         for i, (age, sex, site) in enumerate([(60, "M", "a"), ("70", "F", "b"), (80.0, "F", "c"), (90, "M", "a")])]


CONDITIONS = [{"name": "age"}, {"name": "sex", "type": "categorical"}, {"name": "site", "type": "categorical"}]


def config(categorical_via: str = "cross_attention", conditions: list[dict] = CONDITIONS):
    return config_from_dict({
        "data": {"source": "datalist", "datalist": "/d/list.json", "voxel_size": [16, 16, 16], "conditions": conditions},
        "autoencoder": {"num_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2, "downsample_factors": [2]},
        "ldm": {"unet": {"num_channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                         "num_head_channels": 8},
                "conditioning": {"categorical_via": categorical_via}},
    })


def test_statistics_and_vocabularies_come_from_the_training_split_and_survive_the_checkpoint():
    encoder = ConditionEncoder.fit(config(), ITEMS)
    age, sex, site = encoder.conditions
    assert age == {"name": "age", "type": "continuous", "mean": 75.0, "std": pytest.approx(125 ** 0.5)}
    assert sex["categories"] == ["F", "M"] and site["categories"] == ["a", "b", "c"]
    assert ConditionEncoder.from_state(encoder.state()) == encoder
    assert ConditionEncoder.fit(config_from_dict({}), ITEMS) is None  # no data.conditions: unconditional


def test_cross_attention_context_holds_a_presence_flag_standardised_values_and_one_hot_categories():
    encoder = ConditionEncoder.fit(config(), ITEMS)
    assert encoder.unet_arguments() == {"with_conditioning": True, "cross_attention_dim": 1 + 1 + 2 + 3,
                                        "num_class_embeds": None}
    encoded = encoder.encode([{"age": "85", "sex": "M", "site": "c"}, {"age": 75, "sex": "F", "site": "a"}])
    assert encoded.class_labels is None and encoded.context.shape == (2, 1, 7)
    torch.testing.assert_close(encoded.context[:, 0], torch.tensor([[1, 10 / 125 ** 0.5, 0, 1, 0, 0, 1],
                                                                    [1, 0, 1, 0, 1, 0, 0]], dtype=torch.float32))
    # The null condition is all zeros: no real row has a 0 presence flag.
    assert torch.equal(encoded.null().context, torch.zeros(2, 1, 7))
    assert torch.equal(encoder.null(3).context, torch.zeros(3, 1, 7))


def test_class_embedding_numbers_every_combination_of_categories_after_the_null_class():
    encoder = ConditionEncoder.fit(config("class_embedding"), ITEMS)
    # age still goes through cross-attention; sex x site = 6 combinations + the null class 0
    assert encoder.unet_arguments() == {"with_conditioning": True, "cross_attention_dim": 2, "num_class_embeds": 7}
    rows = [{"age": 75, "sex": s, "site": t} for s in ("F", "M") for t in ("a", "b", "c")]
    labels = encoder.encode(rows).class_labels
    assert sorted(labels.tolist()) == [1, 2, 3, 4, 5, 6] and encoder.null(1).class_labels.tolist() == [0]
    only_categorical = ConditionEncoder.fit(config("class_embedding", CONDITIONS[1:]), ITEMS)
    assert only_categorical.unet_arguments() == {"with_conditioning": False, "cross_attention_dim": None,
                                                 "num_class_embeds": 7}
    assert only_categorical.encode(rows[:1]).context is None
    # MONAI's UNet takes both as its own conditioning inputs.
    unet = build_unet(config("class_embedding").ldm, 2, 3, encoder.unet_arguments())
    out = unet(torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 9]), **encoder.encode(rows[:2]).inputs())
    assert out.shape == (2, 2, 8, 8, 8)


@pytest.mark.parametrize("row, message", [
    ({"sex": "F", "site": "a"}, "table.csv line 2: 'age' is missing"),
    ({"age": "old", "sex": "F", "site": "a"}, "table.csv line 2: 'age' is 'old', not a number"),
    ({"age": "nan", "sex": "F", "site": "a"}, "not a finite number"),
    ({"age": 70, "sex": "X", "site": "a"}, r"table.csv line 2: 'sex' = 'X' is not a category the LDM was trained "
                                           r"with \(\['F', 'M'\]\)"),
])
def test_bad_values_name_their_row_and_key(row, message):
    encoder = ConditionEncoder.fit(config(), ITEMS)
    with pytest.raises(ValueError, match=message):
        encoder.encode([row], ["table.csv line 2"])


def test_fitting_refuses_a_constant_covariate_and_values_outside_the_configured_categories():
    same_age = [{**item, "age": 70} for item in ITEMS]
    with pytest.raises(ValueError, match=r"data.conditions\[0\]: 'age' is 70.0 in every one of the 4 training"):
        ConditionEncoder.fit(config(), same_age)
    fixed = config()
    fixed.data.conditions[1].categories = ["F"]
    with pytest.raises(ValueError, match=r"data.conditions\[1\].categories: .* 'sex' values \['M'\] outside \['F'\]"):
        ConditionEncoder.fit(fixed, ITEMS)


def test_dropout_replaces_whole_samples_by_the_null_condition():
    encoder = ConditionEncoder.fit(config("class_embedding"), ITEMS)
    encoded = encoder.encode([{"age": 60, "sex": "M", "site": "b"}] * 400)
    torch.manual_seed(0)
    dropped = encoded.dropped(0.25)
    null_context = (dropped.context == 0).all(dim=2)[:, 0]
    null_class = dropped.class_labels == 0
    assert torch.equal(null_context, null_class)  # the context and the class are dropped together
    assert 60 < int(null_class.sum()) < 140  # about a quarter
    kept = ~null_class
    assert torch.equal(dropped.context[kept], encoded.context[kept])
    assert encoded.dropped(0.0) is encoded


def test_guided_prediction_extrapolates_from_the_unconditional_one():
    class Probe(torch.nn.Module):  # a "UNet" whose output is the context's sum: 0 for the null condition
        def forward(self, x, timesteps, context=None, class_labels=None):
            return x * 0 + context.sum(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    condition = Conditioning(context=torch.tensor([[[1.0, 2.0]]]))
    x, t = torch.zeros(1, 1, 2, 2, 2), torch.tensor([5])
    assert torch.all(Denoiser(Probe(), condition, guidance=1.0)(x, t) == 3)
    assert torch.all(Denoiser(Probe(), condition, guidance=3.0)(x, t) == 0 + 3 * (3 - 0))
    assert torch.all(Denoiser(Probe(), condition, guidance=0.0)(x, t) == 0)  # guidance 0: the unconditional model


def test_label_maps_become_each_labels_share_at_the_control_resolution():
    assert control_size([8, 10, 8], [16, 32]) == (16, 20, 16) and control_size([8, 8, 8], [16]) == (8, 8, 8)
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[0, 0, :2] = 2
    mask[0, 0, 2:, :2] = 1
    control = control_input(mask, 3, (2, 2, 2))
    assert control.shape == (1, 2, 2, 2, 2)  # labels 1 and 2; background is what they leave
    assert torch.equal(control[0, 1, 0], torch.ones(2, 2)) and torch.equal(control[0, 1, 1], torch.zeros(2, 2))
    assert torch.equal(control[0, 0, 1, 0], torch.ones(2)) and control[0, 0, 0].sum() == 0
    mask[0, 0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"holds labels 0\.\.3, outside 0\.\.2 \(controlnet.num_labels 3\)"):
        control_input(mask, 3, (2, 2, 2))
    with pytest.raises(ValueError, match="not whole numbers"):
        control_input(mask * 0.5, 4, (2, 2, 2))


def test_command_line_values_and_tables(tmp_path):
    assert parse_condition_args(["age=70", " sex = F "]) == {"age": "70", "sex": "F"}
    for bad, message in ((["age"], "expected KEY=VALUE"), (["=3"], "expected KEY=VALUE"),
                         (["age=1", "age=2"], "given twice")):
        with pytest.raises(ValueError, match=message):
            parse_condition_args(bad)
    table = tmp_path / "table.csv"
    table.write_text("age,sex\n70,F\n 80 ,M\n")
    rows, where = read_condition_table(table)
    assert rows == [{"age": "70", "sex": "F"}, {"age": "80", "sex": "M"}]
    assert where == [f"{table} line 2", f"{table} line 3"]
    (tmp_path / "empty.csv").write_text("age,sex\n")
    with pytest.raises(ValueError, match="has no rows"):
        read_condition_table(tmp_path / "empty.csv")


# ------------------------------------------------------------------------------------- MAISI's UNet's own inputs


def maisi_encoder(**unet) -> ConditionEncoder:
    raw = {"data": {"source": "datalist", "datalist": "/d/list.json", "voxel_size": [16, 16, 16]},
           "ldm": {"unet": {"architecture": "maisi", "num_channels": [8, 16], "attention_levels": [False, True],
                            "num_head_channels": 8, "norm_num_groups": 8} | unet}}
    items = [{"image": f"/d/v{i}.nii.gz", "class": c} for i, c in enumerate(["ct", "mri_t1", "ct"])]
    return ConditionEncoder.fit(config_from_dict(raw), items)


def test_maisis_spacing_and_modality_from_cached_and_image_batches():
    encoder = maisi_encoder(modality_key="class")
    assert encoder.maisi["modality"] == "ct" and encoder.names == []  # the training split's most frequent
    assert encoder.item_fields({"image": "x", "class": "mri_t1"}) == {"modality": "mri_t1"}
    cached = {"mu": torch.zeros(2, 4, 2, 2, 2), "voxel_spacing": torch.tensor([[1.5, 1.5, 2.0], [1.0, 1.0, 1.0]]),
              "modality": ["ct", "mri_t1"]}
    condition = encoder.encode_batch(cached)
    assert condition.inputs()["spacing_tensor"].tolist() == [[150.0, 150.0, 200.0], [100.0, 100.0, 100.0]]
    assert condition.class_labels.tolist() == [1, 9] and condition.modality
    images = MetaTensor(torch.zeros(1, 1, 4, 4, 4), affine=torch.diag(torch.tensor([0.8, 0.8, 3.0, 1.0]))[None])
    condition = encoder.encode_batch({"image": images, "class": ["mri_t1"]})  # on the fly: the image's affine
    assert condition.spacing.tolist() == [[pytest.approx(80.0), pytest.approx(80.0), 300.0]]
    with pytest.raises(ValueError, match="modality 'pet' is not in MAISI's vocabulary"):
        encoder.encode([{"voxel_spacing": "1x1x1", "modality": "pet"}])
    with pytest.raises(ValueError, match="voxel spacing '1x1' is not three positive numbers"):
        encoder.encode([{"voxel_spacing": "1x1", "modality": "ct"}])


def test_maisis_null_condition_keeps_the_spacing_and_its_dropout_is_maisis():
    encoder = maisi_encoder(modality="ct")
    condition = encoder.encode([{"voxel_spacing": [1, 1, 1], "modality": "ct"}])
    null = condition.null()
    assert null.class_labels.tolist() == [0] and torch.equal(null.spacing, condition.spacing)
    assert ConditionEncoder.from_state(encoder.state()) == encoder
    torch.manual_seed(0)
    labels = torch.tensor([3, 12, 1, 8] * 500)
    dropped = condition.__class__(class_labels=labels, spacing=torch.ones(2000, 3), modality=True).dropped(0.1)
    assert torch.equal(dropped.spacing, torch.ones(2000, 3))
    # ct_contrast (3) -> ct (1) and mri_flair (12) -> mri (8) in ~10%, every code -> unknown (0) in ~10%.
    for code, coarse in ((3, 1), (12, 8)):
        after = dropped.class_labels[labels == code]
        assert set(after.tolist()) == {code, coarse, 0}
        assert 0.05 < (after == coarse).float().mean() < 0.15 and 0.05 < (after == 0).float().mean() < 0.15
    assert set(dropped.class_labels[labels == 1].tolist()) == {1, 0}
