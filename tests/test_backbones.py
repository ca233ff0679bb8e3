"""Standard backbones (torchvision, timm, your own factory), local weights files, freezing."""

import pytest
import pytorch_lightning as pl
import timm
import torch
from torch import nn
from torchvision import models as tvm

from imgpipe.core.errors import DataError
from imgpipe.learn.factory import build_model
from imgpipe.learn.models import ModuleClassifier, adapt_first_conv
from imgpipe.learn.param_groups import (
    backbone_parameters,
    head_parameters,
    optimizer_groups,
    set_backbone_trainable,
)
from imgpipe.learn.trainer import BackboneFreeze
from imgpipe.learn.weights_file import load_weights


def check_outputs(model, in_channels, size, classes, width):
    model.eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        logits, features = model(x), model.embed(x)
    assert logits.shape == (2, classes)
    assert features.shape == (2, width) and model.num_features == width
    return logits, features


@pytest.mark.parametrize(
    ("name", "in_channels", "size", "width"),
    [
        ("mobilenet_v3_small", 3, 64, 1024),
        ("mobilenet_v3_small", 1, 64, 1024),
        ("timm/resnet10t", 3, 64, 512),
        ("timm/convnext_atto", 1, 64, 320),
    ],
)
def test_torchvision_and_timm_models_give_logits_and_embeddings(name, in_channels, size, width):
    torch.manual_seed(0)
    model = build_model(name, 5, in_channels, size)
    logits, features = check_outputs(model, in_channels, size, 5, width)
    torch.testing.assert_close(model.head(features), logits)


def test_resnet_at_96_px_keeps_the_standard_stem():
    model = build_model("resnet18", 4, 3, 96)
    assert model.backbone.conv1.kernel_size == (7, 7) and model.backbone.conv1.stride == (2, 2)
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
    assert isinstance(model.backbone.fc, nn.Identity) and model.head_keys == ("fc",)
    check_outputs(model, 3, 96, 4, 512)


def test_grey_input_sums_the_first_filters():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, 1, 64)
    assert model.backbone.features[0][0].in_channels == 1


@pytest.mark.parametrize("factory", ["make", "make_with_embed"])
def test_own_factory_is_wrapped_with_its_last_linear_as_head(factory):
    torch.manual_seed(0)
    model = build_model(f"helpers.custom_nets:{factory}", 3, 1, 16)
    assert isinstance(model, ModuleClassifier)
    assert model.head is model.backbone.fc and model.head_keys == ("fc",)
    logits, features = check_outputs(model, 1, 16, 3, 8)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone(x))  # its own output: the logits
        pooled = model.backbone.features(x)
        expected = 2 * pooled if factory == "make_with_embed" else pooled
        torch.testing.assert_close(model.embed(x), expected)
    # Each parameter once: the head is the module's own layer, not a copy.
    assert len(list(model.parameters())) == len(list(model.backbone.parameters()))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("make_wrong_classes", r"last nn.Linear \(fc\) has 4 outputs but the data has 3 classes"),
        ("make_no_linear", "has no nn.Linear"),
        ("make_not_a_module", "returned str, not an nn.Module"),
        ("no_such_factory", "cannot import helpers.custom_nets:no_such_factory"),
    ],
)
def test_bad_factories_are_refused_clearly(factory, message):
    with pytest.raises(DataError, match=message):
        build_model(f"helpers.custom_nets:{factory}", 3, 1, 16)


# ---------------------------------------------------------------- weights files


def assert_backbone_equals(model, reference, skip=()):
    state = model.backbone.state_dict()
    for key, value in reference.items():
        if key in state and key not in skip:
            assert torch.equal(state[key], value), key


def test_torchvision_state_dict_loads_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    reference = tvm.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    model = build_model("resnet18", 5, 3, 96, weights=str(path))
    assert_backbone_equals(model, reference)
    assert set(reference) - set(model.backbone.state_dict()) == {"fc.weight", "fc.bias"}
    assert model.head.out_features == 5


def test_weights_fit_a_grey_small_input_resnet_by_adapting_the_stem(tmp_path):
    torch.manual_seed(1)
    reference = tvm.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({"model": reference, "epoch": 3}, path)  # a training script's checkpoint
    model = build_model("resnet18", 5, 1, 16, weights=str(path))
    stem = adapt_first_conv(reference["conv1.weight"], 1, 3)
    torch.testing.assert_close(model.backbone.conv1.weight, stem)
    assert_backbone_equals(model, reference, skip={"conv1.weight"})


def test_timm_checkpoint_loads_into_the_backbone(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model("resnet10t").state_dict()
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}}, path)
    model = build_model("timm/resnet10t", 3, 3, 64, weights=path)
    assert_backbone_equals(model, reference)
    # Grey input: the first filters are the file's RGB filters summed.
    grey = build_model("timm/resnet10t", 3, 1, 64, weights=path)
    first = "conv1.0.weight"
    torch.testing.assert_close(
        grey.backbone.state_dict()[first], reference[first].sum(1, keepdim=True)
    )


def test_small_input_vgg_reads_the_convolutions_of_a_vgg_file(tmp_path):
    torch.manual_seed(3)
    features = tvm.vgg.make_layers(tvm.vgg.cfgs["A"], batch_norm=True)
    head = {"classifier.0.weight": torch.zeros(2, 3), "classifier.6.bias": torch.zeros(1000)}
    reference = {**{f"features.{k}": v for k, v in features.state_dict().items()}, **head}
    path = tmp_path / "vgg.pth"
    torch.save(reference, path)
    model = build_model("vgg11_bn", 4, 1, 16, weights=path)
    torch.testing.assert_close(
        model.backbone.features[0].weight, reference["features.0.weight"].sum(1, keepdim=True)
    )
    assert_backbone_equals(model, reference, skip={"features.0.weight"})


def test_an_imgpipe_checkpoint_is_a_starting_point_for_other_classes(tmp_path):
    torch.manual_seed(4)
    trained = build_model("resnet18", 10, 1, 16)
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    state |= {"mean": torch.zeros(1, 1, 1, 1), "std": torch.ones(1, 1, 1, 1)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"num_classes": 10}}, path)
    model = build_model("resnet18", 3, 1, 16, weights=path)
    assert_backbone_equals(model, trained.backbone.state_dict())
    assert model.head.out_features == 3


def test_own_factory_weights_skip_its_head(tmp_path):
    torch.manual_seed(5)
    reference = build_model("helpers.custom_nets:make", 7, 3, 16).backbone.state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(reference, path)
    model = build_model("helpers.custom_nets:make", 2, 3, 16, weights=path)
    assert_backbone_equals(model, reference, skip={"fc.weight", "fc.bias"})


@pytest.fixture
def resnet_file(tmp_path):
    torch.manual_seed(6)
    return tmp_path / "weights.pth", tvm.resnet18(weights=None).state_dict()


def test_extra_key_is_named(resnet_file):
    path, state = resnet_file
    torch.save({**state, "extra.weight": torch.zeros(3)}, path)
    model = build_model("resnet18", 5, 3, 64)
    with pytest.raises(DataError) as err:
        load_weights(model, path, "resnet18")
    message = str(err.value)
    assert str(path) in message and "1 unexpected key (extra.weight)" in message
    assert "missing" not in message


def test_missing_keys_are_named_and_counted(resnet_file):
    path, state = resnet_file
    gone = [k for k in state if k.startswith("layer4.")]
    torch.save({k: v for k, v in state.items() if k not in gone}, path)
    with pytest.raises(DataError) as err:
        build_model("resnet18", 5, 3, 64, weights=path)
    message = str(err.value)
    weights = [k for k in gone if not k.endswith("num_batches_tracked")]
    assert str(path) in message and f"{len(weights)} missing keys (layer4.0.conv1.weight" in message
    assert ", ...)" in message  # only the first ten are listed


def test_shape_mismatch_is_named(resnet_file):
    path, state = resnet_file
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(state, path)
    with pytest.raises(DataError) as err:
        build_model("resnet18", 5, 3, 64, weights=path)
    message = str(err.value)
    assert (
        str(path) in message
        and "1 shape mismatch (layer1.0.conv1.weight: file (64, 64, 5, 5), model (64, 64, 3, 3))"
        in message
    )


def test_weights_of_another_architecture_are_refused(resnet_file):
    path, state = resnet_file
    torch.save(state, path)
    with pytest.raises(DataError, match=r"does not fit model mobilenet_v3_small: \d+ missing keys"):
        build_model("mobilenet_v3_small", 5, 3, 64, weights=path)


def test_missing_and_unreadable_files_are_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(DataError, match=f"model.weights: {missing} not found"):
        build_model("resnet18", 5, 3, 64, weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(DataError, match=f"cannot read {garbage}"):
        build_model("resnet18", 5, 3, 64, weights=garbage)


# ---------------------------------------------------------------- freezing


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_identical(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def train_steps(model, frozen=True, steps=2, size=8, in_channels=3, classes=4):
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.05, 0.1), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, in_channels, size, size)
        y = torch.randint(0, classes, (4,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if frozen:
            assert all(p.grad is None for p in backbone_parameters(model))
        optimizer.step()


@pytest.mark.parametrize("keep_requires_grad", [False, True])
def test_frozen_backbone_is_bit_identical_and_the_head_learns(keep_requires_grad):
    torch.manual_seed(7)
    model = build_model("resnet18", 4, 3, 8)
    set_backbone_trainable(model, False, keep_requires_grad=keep_requires_grad)
    model.train()  # what Lightning calls each epoch: norm layers must stay in eval mode
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    backbone, head = snapshot(model.backbone), snapshot(model.head)
    train_steps(model)
    assert_identical(backbone, model.backbone)  # parameters and running statistics
    assert not torch.equal(head["weight"], model.head.weight)
    set_backbone_trainable(model, True)
    assert all(m.training for m in model.backbone.modules())
    train_steps(model, frozen=False)
    assert not torch.equal(backbone["conv1.weight"], model.backbone.conv1.weight)


def test_frozen_factory_model_trains_only_its_last_linear():
    torch.manual_seed(8)
    model = build_model("helpers.custom_nets:make", 4, 3, 8)
    assert [id(p) for p in head_parameters(model)] == [
        id(p) for p in model.backbone.fc.parameters()
    ]
    set_backbone_trainable(model, False, keep_requires_grad=True)
    before = snapshot(model.backbone.features)
    head = model.head.weight.detach().clone()
    train_steps(model)
    assert_identical(before, model.backbone.features)
    assert not torch.equal(head, model.head.weight)


def test_optimizer_groups_scale_the_backbone_learning_rate():
    model = build_model("smallcnn", 3, 1, 8, channels=(4,))
    groups = optimizer_groups(model, 0.1, 0.01, backbone_lr_mult=0.25)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.025)
    assert by_name["head"]["lr"] == 0.1 and by_name["head_no_decay"]["weight_decay"] == 0.0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


class TinyModule(pl.LightningModule):
    """The shape of imgpipe's ImageClassifier: a Classifier as ``.model``, per-step one-cycle."""

    def __init__(self, freeze_log):
        super().__init__()
        self.model = build_model("smallcnn", 3, 1, 8, channels=(4,))
        self.freeze_log = freeze_log

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def on_train_epoch_end(self):
        self.freeze_log.append(snapshot(self.model.backbone))

    def configure_optimizers(self):
        groups = optimizer_groups(self.model, 0.05, 0.01, backbone_lr_mult=0.5)
        optimizer = torch.optim.AdamW(groups)
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


@pytest.mark.parametrize(("freeze", "changed"), [(1, [False, True]), ("backbone", [False, False])])
def test_lightning_callback_unfreezes_after_the_given_epochs(freeze, changed):
    torch.manual_seed(9)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,)))
    log = []
    module = TinyModule(log)
    start = snapshot(module.model.backbone)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[BackboneFreeze(freeze)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    states = [start, *log]
    for i, expect in enumerate(changed):
        same = all(torch.equal(states[i][k], states[i + 1][k]) for k in start)
        assert same != expect, f"epoch {i}"
