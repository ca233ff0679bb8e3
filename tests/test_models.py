"""Model builders: shapes for every name and channel count, small-input layouts, names refused clearly."""

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import Conv2d

from imgpipe.core.errors import DataError
from imgpipe.learn.factory import build_model, normalisation
from imgpipe.learn.models import IMAGENET_MEAN, IMAGENET_STD, adapt_first_conv
from imgpipe.workflow.config import ConfigError, check_config, load_schema

ROOT = Path(__file__).resolve().parents[1]
SMALL_NAMES = ("smallcnn", "resnet18", "vgg11_bn")


def state_hash(model):
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def test_small_cnn_is_unchanged_for_the_same_seed():
    # Hashes of the weights the small CNN had before torchvision / timm models were added:
    # the demo's results depend on them.
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1, 16, channels=(16, 32, 64), dropout=0.3)
    assert state_hash(model) == "3901353f3d3748534ba81083301e997c1c3ebb67aeb47e2ddcf5426a93451ae3"
    torch.manual_seed(0)
    model = build_model("smallcnn", 4, 3, 20, channels=(8,), dropout=0.1)
    assert state_hash(model) == "776abd912614815a59e9f8d658768994ae4db35c3d379cfb1b75f8c263cd0d69"


@pytest.mark.parametrize("name", SMALL_NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_models_give_logits_and_embeddings_of_the_right_shape(name, in_channels):
    torch.manual_seed(0)
    model = build_model(
        name, num_classes=7, in_channels=in_channels, image_size=16, channels=[8, 16]
    )
    model.eval()
    x = torch.randn(2, in_channels, 16, 16)
    with torch.no_grad():
        logits, features = model(x), model.embed(x)
    width = {"smallcnn": 16, "resnet18": 512, "vgg11_bn": 512}[name]
    assert logits.shape == (2, 7)
    assert features.shape == (2, width) and model.num_features == width
    # forward is the head applied to the embedding (dropout is off in eval mode)
    torch.testing.assert_close(model.head(features), logits)


@pytest.mark.parametrize("name", SMALL_NAMES)
@pytest.mark.parametrize("size", [8, 32])
def test_models_accept_other_small_sizes_and_train(name, size):
    model = build_model(name, num_classes=3, in_channels=1, image_size=size, channels=[8])
    x = torch.randn(4, 1, size, size)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_small_cnn_follows_the_channel_config():
    model = build_model("smallcnn", 10, 1, 16, channels=[4, 8, 12], dropout=0.5)
    convs = [m for m in model.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 12, 12]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.backbone) == 3
    assert model.dropout.p == 0.5 and model.head.in_features == 12


def test_vgg_keeps_only_the_pools_a_small_input_allows():
    model = build_model("vgg11_bn", 10, 3, 16)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.backbone.modules()) == 4
    assert model.head_keys == ("classifier",)


def test_resnet_gets_the_small_input_stem_only_below_64_px():
    small = build_model("resnet18", 10, 1, 16).backbone
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == 1
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in small.modules())
    standard = build_model("resnet18", 10, 3, 64).backbone
    assert standard.conv1.kernel_size == (7, 7) and standard.conv1.stride == (2, 2)
    assert isinstance(standard.maxpool, torch.nn.MaxPool2d)


@pytest.mark.parametrize(("name", "last_norm"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_resnets_from_scratch_start_each_residual_block_as_the_identity(name, last_norm):
    # torchvision's default init made the eval-mode validation loss of resnet18 from
    # scratch jump 2.6 -> 142 in its second epoch on a few hundred icons.
    backbone = build_model(name, 6, 3, 96).backbone
    blocks = [m for m in backbone.modules() if hasattr(m, last_norm) and hasattr(m, "conv1")]
    assert blocks
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last_norm).weight) == 0
    assert torch.count_nonzero(backbone.bn1.weight) > 0


def test_unknown_names_are_refused_with_close_matches():
    with pytest.raises(DataError, match=r"unknown model 'resnt18'.*close: resnet18"):
        build_model("resnt18", 10, 1, 16)
    with pytest.raises(DataError, match=r"timm has it: timm/convnext_atto"):
        build_model("convnext_atto", 10, 3, 64)
    with pytest.raises(DataError, match=r"timm has no model 'convnxt_atto'.*timm/convnext_atto"):
        build_model("timm/convnxt_atto", 10, 3, 64)
    with pytest.raises(DataError, match="no_such_package_xyz"):
        build_model("no_such_package_xyz.nets:make", 10, 3, 16)
    with pytest.raises(DataError, match="at least 2 classes"):
        build_model("smallcnn", 1, 1, 16)


def test_models_without_a_linear_classifier_are_refused_clearly():
    with pytest.raises(DataError, match=r"squeezenet1_1 has no final nn.Linear"):
        build_model("squeezenet1_1", 10, 3, 64)


def test_too_small_inputs_name_the_model_the_size_and_the_smallest_that_works():
    with pytest.raises(DataError) as err:
        build_model("alexnet", 10, 3, 16)
    message = str(err.value)
    assert "alexnet" in message and "image.size 16 px" in message
    assert "the smallest size that works is 63 px" in message
    build_model("alexnet", 10, 3, 63)  # and it does


def test_first_conv_adaptation_keeps_the_response_to_grey_input():
    torch.manual_seed(0)
    rgb = torch.randn(4, 3, 7, 7)
    grey = adapt_first_conv(rgb, 1, 7)
    assert grey.shape == (4, 1, 7, 7)
    torch.testing.assert_close(grey[:, 0], rgb.sum(dim=1))
    small = adapt_first_conv(rgb, 1, 3)
    assert small.shape == (4, 1, 3, 3)
    # Total weight (the response to a flat grey patch) is preserved by the resampling.
    torch.testing.assert_close(
        small.sum(dim=(1, 2, 3)), rgb.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4
    )
    assert adapt_first_conv(rgb, 5, 7).shape == (4, 5, 7, 7)


def test_normalisation_is_imagenet_with_weights_and_the_data_otherwise():
    data = ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert normalisation({"name": "resnet18"}, 3, *data) == data
    assert normalisation({"weights": "w.pt"}, 3, *data) == (
        list(IMAGENET_MEAN),
        list(IMAGENET_STD),
    )
    assert normalisation({"weights": "w.pt", "normalize": "data"}, 3, *data) == data
    assert normalisation({"normalize": "imagenet"}, 3, *data)[0] == list(IMAGENET_MEAN)
    mean, std = normalisation({"weights": "w.pt"}, 1, [0.5], [0.2])
    assert mean == [pytest.approx(0.449)] and std == [pytest.approx(0.226)]
    with pytest.raises(DataError, match="model.normalize"):
        normalisation({"normalize": "bogus"}, 3, *data)


def test_the_retired_hub_cache_switch_points_to_model_weights():
    with pytest.raises(DataError, match="set model.weights"):
        build_model("resnet18", 10, 3, 64, pretrained=True)


@pytest.mark.parametrize(
    ("section", "key", "value", "ok"),
    [
        ("train", "freeze", "none", True),
        ("train", "freeze", "backbone", True),
        ("train", "freeze", 3, True),
        ("train", "freeze", 0, False),
        ("train", "freeze", "head", False),
        ("train", "freeze", 1.5, False),
        ("train", "freeze", True, False),
        ("train", "backbone_lr_mult", 0.1, True),
        ("train", "backbone_lr_mult", 0, False),
        ("model", "name", "timm/convnext_atto", True),
        ("model", "name", "helpers.custom_nets:make", True),
        ("model", "name", "mypkg.nets:make", False),  # no such module: refused at start-up
        ("model", "name", "", False),
        ("model", "weights", "weights/resnet18.pth", True),
        ("model", "weights", None, True),
        ("model", "normalize", "imagenet", True),
        ("model", "normalize", "yes", False),
        ("model", "stem", "none", True),
        ("model", "stem", "patch", False),
        ("model", "pretrained", False, False),
    ],
)
def test_schema_of_the_model_and_freeze_keys(section, key, value, ok):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config[section][key] = value
    schema = load_schema(ROOT / "config" / "schema.yaml")
    if ok:
        check_config(config, schema)
    else:
        with pytest.raises(ConfigError, match=rf"{section}\.{key}:"):
            check_config(config, schema)


# ---------------------------------------------------------------- smallcnn's stem


def key_shapes(module):
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


def conv_macs(model, size, in_channels=3):
    """Multiply-accumulates of the model's convolutions for one image (from the shapes alone)."""
    total = 0

    def count(conv, args, out):
        nonlocal total
        total += out.numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, Conv2d)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_channels, size, size))
    for hook in hooks:
        hook.remove()
    return total


def old_small_cnn_layout(in_channels, channels):
    """smallcnn's (key, shape) list before the stem existed: per block conv, bn, relu, conv, bn, relu, pool."""
    layout, previous = [], in_channels
    for block, width in enumerate(channels):
        for offset, cin in ((0, previous), (3, width)):
            conv, norm = block * 7 + offset, block * 7 + offset + 1
            layout.append((f"{conv}.weight", (width, cin, 3, 3)))
            for name in ("weight", "bias", "running_mean", "running_var"):
                layout.append((f"{norm}.{name}", (width,)))
            layout.append((f"{norm}.num_batches_tracked", ()))
        previous = width
    return layout


def test_below_64_px_the_small_cnn_has_no_stem():
    model = build_model("smallcnn", 10, 1, 16, channels=(16, 32, 64))
    assert key_shapes(model.backbone) == old_small_cnn_layout(1, (16, 32, 64))
    for size in (16, 63):
        torch.manual_seed(0)
        auto = build_model("smallcnn", 4, 3, size, channels=(8, 16), stem="auto")
        torch.manual_seed(0)
        none = build_model("smallcnn", 4, 3, size, channels=(8, 16), stem="none")
        assert state_hash(auto) == state_hash(none)


@pytest.mark.parametrize(("size", "stride"), [(64, 2), (96, 2), (127, 2), (128, 4), (224, 4)])
def test_the_stem_shrinks_the_image_before_the_blocks(size, stride):
    model = build_model("smallcnn", 6, 3, size, channels=(16, 32, 64))
    stem_convs = [m for m in model.backbone[: 3 * (stride // 2)] if isinstance(m, Conv2d)]
    assert [c.stride for c in stem_convs] == [(2, 2)] * (stride // 2)
    block_input = model.backbone[: 3 * (stride // 2)](torch.zeros(1, 3, size, size))
    assert block_input.shape == (1, 16, -(-size // stride), -(-size // stride))
    x = torch.zeros(2, 3, size, size)
    assert model(x).shape == (2, 6) and model.embed(x).shape == (2, 64)


@pytest.mark.parametrize("size", [96, 224])
def test_the_stem_cuts_the_convolution_work_several_times(size):
    with_stem = build_model("smallcnn", 6, 3, size, stem="auto")
    without = build_model("smallcnn", 6, 3, size, stem="none")
    macs = conv_macs(with_stem, size)
    assert conv_macs(without, size) > 3 * macs
    if size == 96:  # resnet18 is the slow part of this test: once is enough
        assert conv_macs(build_model("resnet18", 6, 3, size), size) > 5 * macs
    # A few more weights (the stem), not a wider model.
    params = sum(p.numel() for p in with_stem.parameters())
    assert params < 1.2 * sum(p.numel() for p in without.parameters())


def test_an_unknown_stem_is_refused():
    with pytest.raises(DataError, match="model.stem: 'patch' is not one of auto, none"):
        build_model("smallcnn", 3, 3, 96, stem="patch")
