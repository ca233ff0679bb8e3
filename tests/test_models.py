"""Model builders: shapes for every name and channel count, small inputs, pretrained weights from the cache only."""

import pytest
import torch
from torchvision import models as tvm

from imgpipe.errors import DataError
from imgpipe.models import MODEL_NAMES, adapt_first_conv, build_model, hub_checkpoint


@pytest.mark.parametrize("name", MODEL_NAMES)
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
    assert features.shape == (2, width)
    # forward is the head applied to the embedding (dropout is off in eval mode)
    torch.testing.assert_close(model.head(features), logits)


@pytest.mark.parametrize("name", MODEL_NAMES)
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
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.backbone) == 4


def test_resnet_stem_is_small_input_friendly():
    model = build_model("resnet18", 10, 1, 16)
    stem = model.backbone[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.in_channels == 1
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.backbone.modules())


def test_bad_names_and_class_counts_are_refused():
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        build_model("vit", 10, 1, 16)
    with pytest.raises(DataError, match="at least 2 classes"):
        build_model("smallcnn", 1, 1, 16)
    with pytest.raises(DataError, match="smallcnn"):
        build_model("smallcnn", 10, 1, 16, pretrained=True)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_pretrained_without_cached_weights_names_the_missing_file(name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / hub_checkpoint(name).name
    with pytest.raises(DataError, match="not found at " + str(expected)) as err:
        build_model(name, 10, 3, 16, pretrained=True)
    assert "nothing is downloaded" in str(err.value)


def test_pretrained_resnet_loads_cached_weights_and_adapts_the_stem(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(1)
    reference = tvm.resnet18(weights=None).state_dict()
    path = hub_checkpoint("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference, path)
    model = build_model("resnet18", 10, 1, 16, pretrained=True)
    layer1 = model.backbone[3]
    torch.testing.assert_close(layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    expected_stem = adapt_first_conv(reference["conv1.weight"], 1, 3)
    torch.testing.assert_close(model.backbone[0].weight, expected_stem)
    assert model.head.out_features == 10


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


def test_pretrained_vgg_loads_the_cached_convolutions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(2)
    features = tvm.vgg.make_layers(tvm.vgg.cfgs["A"], batch_norm=True)
    # Only the convolutional part is read: a file holding just those keys is enough here.
    reference = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = hub_checkpoint("vgg11_bn")
    path.parent.mkdir(parents=True)
    torch.save(reference, path)
    model = build_model("vgg11_bn", 4, 1, 16, pretrained=True)
    torch.testing.assert_close(model.backbone[4].weight, reference["features.4.weight"])
    torch.testing.assert_close(
        model.backbone[0].weight, reference["features.0.weight"].sum(1, keepdim=True)
    )
    torch.testing.assert_close(model.backbone[0].bias, reference["features.0.bias"])
