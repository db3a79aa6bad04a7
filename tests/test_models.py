"""Backbones, center of mass, official checkpoint compatibility and safety, keyreg model format."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from conftest import FIXTURES, need_shared, tiny_model
from keyreg.errors import CheckpointError
from keyreg.models import (ArchitectureConfig, KeypointDetector, ModelConfig, build_backbone, center_of_mass,
                           infer_architecture, load_model, power_weights, save_model)

CHECKPOINTS = [("conv-k32.h5", "conv"), ("truncatedunet-l4-k32.pth.tar", "truncatedunet"),
               ("truncatedunet-l4-k32-legacy.pth.tar", "truncatedunet")]


@pytest.mark.parametrize("filename,backbone", CHECKPOINTS)
def test_official_checkpoints_reproduce_official_keypoints(filename, backbone):
    need_shared(FIXTURES)
    expected = np.load(FIXTURES / "expected.npz")
    model = load_model(FIXTURES / filename)
    assert model.config.architecture.backbone == backbone
    assert model.config.architecture.num_keypoints == 32
    for image in ("fixed", "moving"):
        x = torch.from_numpy(expected[image])[None, None]
        with torch.no_grad():
            heat = model.heatmaps(x)
            points, _ = model(x)
        assert tuple(heat.shape[2:]) == tuple(expected[f"{backbone}_{image}_heatmap_shape"])
        np.testing.assert_allclose(points[0].numpy(), expected[f"{backbone}_{image}_points_ij"], atol=1e-5, rtol=0)


def test_center_of_mass_matches_official_probe():
    need_shared(FIXTURES)
    expected = np.load(FIXTURES / "expected.npz")
    pts, _ = center_of_mass(torch.from_numpy(expected["com_probe_heatmap"]))
    np.testing.assert_allclose(pts[0].numpy(), expected["com_probe_points_ij"], atol=1e-6)


def test_official_architecture_inferred_from_shapes():
    need_shared(FIXTURES)
    unet = load_model(FIXTURES / "truncatedunet-l4-k32.pth.tar").config.architecture
    assert (unet.num_levels, unet.num_truncated, unet.f_maps) == (4, 1, 32)
    with pytest.raises(CheckpointError, match="not the requested conv"):
        load_model(FIXTURES / "truncatedunet-l4-k32.pth.tar", backbone="conv")
    with pytest.raises(CheckpointError, match="64 keypoints|not the requested 64"):
        load_model(FIXTURES / "conv-k32.h5", num_keypoints=64)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    model = build_backbone("conv", 4)
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": model.state_dict(), "args": _Evil(marker), "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_checkpoint_with_namespace_args_and_prefixes(tmp_path):
    net = build_backbone("truncatedunet", 6, num_levels=3, num_truncated=1, f_maps=8)
    state = {f"keypoint_extractor.module.{k}": v for k, v in net.state_dict().items()}
    args = argparse.Namespace(num_keypoints=6, backbone="truncatedunet", num_levels_for_unet=3,
                              num_truncated_layers_for_truncatedunet=1)
    torch.save({"state_dict": state, "args": args, "optimizer": {"param_groups": []}}, tmp_path / "m.h5")
    model = load_model(tmp_path / "m.h5")
    assert model.config.architecture == ArchitectureConfig("truncatedunet", 6, 3, 1, 8)
    assert model.config.weighting == "power"  # BrainMorph preset
    bad = argparse.Namespace(num_keypoints=99)
    torch.save({"state_dict": state, "args": bad}, tmp_path / "bad.h5")
    with pytest.raises(CheckpointError, match="num_keypoints=99"):
        load_model(tmp_path / "bad.h5")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x89HDF\r\n\x1a\n" + b"\0" * 100])
def test_unreadable_checkpoints(tmp_path, content):
    path = tmp_path / "model.h5"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pth.tar")


def test_unknown_bundled_name():
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


@pytest.mark.parametrize("backbone,kwargs,reduction", [
    ("conv", {}, 16), ("unet", {"num_levels": 3, "f_maps": 8}, 1),
    ("truncatedunet", {"num_levels": 4, "num_truncated": 2, "f_maps": 8}, 4)])
def test_backbone_shapes_and_inference(backbone, kwargs, reduction):
    net = build_backbone(backbone, 5, **kwargs)
    x = torch.rand(2, 1, 32, 48, 16)
    heat = net(x)
    assert heat.shape == (2, 5, 32 // reduction, 48 // reduction, 16 // reduction)
    arch = infer_architecture(net.state_dict())
    assert arch.backbone == backbone and arch.num_keypoints == 5
    if backbone != "conv":
        assert (arch.num_levels, arch.num_truncated, arch.f_maps) == (kwargs["num_levels"],
                                                                      kwargs.get("num_truncated", 0), 8)


def test_batch_of_two_equals_two_single_passes():
    model = tiny_model()
    x = torch.rand(2, 1, 24, 24, 24)
    with torch.no_grad():
        both, mass = model(x)
        one, _ = model(x[:1])
        two, _ = model(x[1:])
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-5, rtol=0)
    assert mass.shape == (2, 12)


def test_center_of_mass_frame():
    h = torch.zeros(1, 2, 5, 7, 3)
    h[0, 0, 4, 0, 1] = 2.0  # last, first, middle voxel
    h[0, 1, 1, 3, 0] = 1.0
    h[0, 1, 3, 3, 0] = 1.0
    pts, mass = center_of_mass(h)
    torch.testing.assert_close(pts[0], torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, -1.0]]))
    torch.testing.assert_close(mass[0], torch.tensor([2.0, 2.0]))
    neg = center_of_mass(-torch.ones(1, 1, 3, 3, 3))  # all negative: no mass, weight 0
    assert neg[1].item() == 0


def test_center_of_mass_gradcheck():
    h = torch.rand(1, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: center_of_mass(t)[0].double(), (h,), fast_mode=True)


def test_power_weights_normalised():
    w = power_weights(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 1.0, 5.0]]))
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.4, 0.0]]))
    torch.testing.assert_close(power_weights(torch.zeros(1, 4), torch.zeros(1, 4)), torch.full((1, 4), 0.25))


def test_keyreg_format_round_trip(tmp_path):
    model = tiny_model()
    weights, config = save_model(model, tmp_path / "m")
    assert weights.suffix == ".safetensors" and config.suffix == ".json"
    assert weights.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    doc = json.loads(config.read_text())
    assert doc["format"] == "keyreg-model" and doc["architecture"]["num_keypoints"] == 12
    assert doc["preprocessing"]["grid"]["shape"] == [24, 24, 24]
    loaded = load_model(weights)
    x = torch.rand(1, 1, 24, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
    assert load_model(config).config.name == "tiny-test"
    assert load_model(tmp_path).config.name == "tiny-test"  # a directory with one model


def test_keyreg_format_errors(tmp_path):
    weights, config = save_model(tiny_model(), tmp_path / "m")
    doc = json.loads(config.read_text())
    doc["architecture"]["num_keypoints"] = 7
    config.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(weights)
    config.unlink()
    with pytest.raises(CheckpointError, match="config m.json is missing"):
        load_model(weights)
    weights.write_bytes(b"garbage")
    config.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_model(weights)


def test_model_config_round_trip():
    cfg = tiny_model().config
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(KeypointDetector(again), KeypointDetector)


def test_model_config_refuses_duplicate_keypoint_names():
    from keyreg.errors import ConfigError

    d = json.loads(tiny_model().config.to_json())
    d["keypoint_names"] = ["a"] * d["architecture"]["num_keypoints"]
    with pytest.raises(ConfigError, match="keypoint_names must be distinct .* 'a' occurs 12 times"):
        ModelConfig.from_dict(d)
