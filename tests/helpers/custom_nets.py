"""Model factories for ``model.name: helpers.custom_nets:<factory>`` in the tests (tests/ is on sys.path)."""

from torch import nn


class TinyNet(nn.Module):
    """conv-bn-relu, global pooling, then a linear classifier: its output is the logits."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class TinyNetWithEmbed(TinyNet):
    """TinyNet with its own ``embed`` (features times two, to tell it from the hook's)."""

    def embed(self, x):
        return 2 * self.features(x)


def make(num_classes, in_channels, image_size):
    return TinyNet(num_classes, in_channels)


def make_with_embed(num_classes, in_channels, image_size):
    return TinyNetWithEmbed(num_classes, in_channels)


def make_wrong_classes(num_classes, in_channels, image_size):
    return TinyNet(num_classes + 1, in_channels)


def make_no_linear(num_classes, in_channels, image_size):
    return nn.Conv2d(in_channels, num_classes, 1)


def make_not_a_module(num_classes, in_channels, image_size):
    return "a string"


# Not factories: refused by the start-up check of model.name (tests/test_config.py).
WIDTH = 8


def takes_one(num_classes):
    return TinyNet(num_classes, 3)
