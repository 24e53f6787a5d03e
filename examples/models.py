"""Networks used by the GOT examples.

``build_model(name, num_classes, in_channels)`` builds one of

* ``"digitsnet"`` -- a tiny CNN for the 8x8 scikit-learn digits (runs in seconds on a CPU);
* ``"smallcnn"``  -- the Carlini-Wagner MNIST CNN as shipped in TRADES ``models/small_cnn.py``
  (conv32-conv32-pool-conv64-conv64-pool, fc200-fc200-fc10, dropout 0.5); the paper's MNIST net;
* ``"resnet18"``  -- the CIFAR ResNet-18 (3x3 stem, no max-pool) used by TRADES / the paper;
* ``"wrn34-10"``  -- WideResNet-34-10 as in TRADES ``models/wideresnet.py``.

``default_layer(name)`` names the penultimate representation z = g(x) on which the GOT
regulariser transports (the latent space of the paper's Fig. 6).  Every model exposes that
representation as the output of a *distinct* module so a forward hook on it fires exactly once
per forward pass (see the note in ``SmallCNN``).

TRADES checkpoints load into ``smallcnn`` (its named keys are mapped to the indices used here),
``resnet18`` and ``wrn34-10`` (with ``strict=False``: TRADES registers an unused ``sub_block1``
that is left out here, see ``WideResNet``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["build_model", "default_layer", "MODEL_NAMES", "DigitsNet", "SmallCNN", "ResNet18", "WideResNet"]


class DigitsNet(nn.Module):
    """Tiny CNN for 1x8x8 inputs: conv16-conv32-pool(2) -> fc128 -> fc(num_classes).

    Sized so an adversarial-training epoch on the 1257 training digits takes about a second on
    one CPU core.  Penultimate layer: ``classifier.1`` (the ReLU after fc128).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),  # 0, 1
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),  # 2, 3
            nn.MaxPool2d(2, 2),
            nn.Flatten(),  # 4, 5
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * (image_size // 2) ** 2, 128),
            nn.ReLU(),  # 0, 1
            nn.Linear(128, num_classes),  # 2
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# TRADES' SmallCNN names its layers; here they are indexed ("classifier.4") like any nn.Sequential.
_SMALLCNN_TRADES_NAMES = {
    "feature_extractor": [
        "conv1",
        "relu1",
        "conv2",
        "relu2",
        "maxpool1",
        "conv3",
        "relu3",
        "conv4",
        "relu4",
        "maxpool2",
    ],
    "classifier": ["fc1", "relu1", "drop", "fc2", "relu2", "fc3"],
}


def _accept_trades_smallcnn_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: rename TRADES keys (``classifier.fc3.weight``) to indices."""
    for block, names in _SMALLCNN_TRADES_NAMES.items():
        for index, name in enumerate(names):
            for leaf in ("weight", "bias"):
                old = f"{prefix}{block}.{name}.{leaf}"
                if old in state_dict:
                    state_dict[f"{prefix}{block}.{index}.{leaf}"] = state_dict.pop(old)


class SmallCNN(nn.Module):
    """Carlini-Wagner MNIST CNN, layer for layer as TRADES ``models/small_cnn.py``.

    ``feature_extractor``: conv32-relu-conv32-relu-pool-conv64-relu-conv64-relu-pool (0..9);
    ``classifier``: fc200 (0), relu (1), dropout 0.5 (2), fc200 (3), relu (4), fc (5).
    Penultimate layer: ``classifier.4``.  TRADES checkpoints, whose keys use the layer names
    (``classifier.fc1.weight``), load directly.

    One deliberate change: TRADES reuses a single ``nn.ReLU(True)`` instance for all six
    activations, so a forward hook on one of them would fire six times per forward and hand the
    GOT regulariser the wrong tensor.  Here every activation is its own parameter-free module.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, drop: float = 0.5) -> None:
        super().__init__()
        self.num_channels = in_channels
        self.num_labels = num_classes
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 200),
            nn.ReLU(),
            nn.Dropout(drop),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        # TRADES zero-initialises the last layer; kept for parity with the reference.
        nn.init.constant_(self.classifier[5].weight, 0)
        nn.init.constant_(self.classifier[5].bias, 0)
        self._register_load_state_dict_pre_hook(_accept_trades_smallcnn_keys, with_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.feature_extractor(x)
        return self.classifier(features.flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016), CIFAR variant as in TRADES ``models/resnet.py``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem without max-pool, stages 64-128-256-512, global average pool.

    TRADES writes the pooling as ``F.avg_pool2d(out, 4)``; it is a module here
    (``AdaptiveAvgPool2d(1)``, identical on 32x32 inputs) so ``flatten`` -- the 512-d
    penultimate feature -- can be hooked.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.pool(out)))


class WideBasicBlock(nn.Module):
    """Pre-activation wide block of Zagoruyko & Komodakis (2016), as in TRADES."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-k (default 34-10) as in TRADES ``models/wideresnet.py``.

    TRADES also builds a ``sub_block1`` that its forward never uses; it is omitted here because
    unused parameters break ``DistributedDataParallel`` (load TRADES checkpoints with
    ``strict=False``).  The global pool and flatten are modules so ``flatten`` can be hooked.
    """

    def __init__(
        self,
        depth: int = 34,
        num_classes: int = 10,
        widen_factor: int = 10,
        drop_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        assert (depth - 4) % 6 == 0, "WideResNet depth must be 6n+4"
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.flatten(self.pool(out)))


_DEFAULT_LAYERS = {
    "digitsnet": "classifier.1",
    "smallcnn": "classifier.4",
    "resnet18": "flatten",
    "wrn34-10": "flatten",
}
MODEL_NAMES = tuple(_DEFAULT_LAYERS)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x ``image_size`` x ``image_size`` inputs in [0, 1]."""
    if name == "digitsnet":
        return DigitsNet(num_classes, in_channels, image_size)
    if name == "smallcnn":
        if image_size != 28:
            raise ValueError(f"smallcnn expects 28x28 inputs (MNIST), got {image_size}x{image_size}")
        return SmallCNN(num_classes, in_channels)
    if name == "resnet18":
        return ResNet18(num_classes, in_channels)
    if name == "wrn34-10":
        return WideResNet(34, num_classes, 10, in_channels=in_channels)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


def default_layer(name: str) -> str:
    """Name (for ``model.get_submodule``) of the penultimate representation GOT transports."""
    try:
        return _DEFAULT_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}") from None
