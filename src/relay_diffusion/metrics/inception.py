"""Inception-v3 of the TensorFlow graph ``inception-2015-12-05`` (docs/math.md §11).

Our own module definition, so that every weight format (TorchScript, the StyleGAN3/EDM pickle,
torch-fidelity / pytorch-fid ``.pth``) loads into one network that we can read intermediate layers
from and run in any dtype. Sub-module names follow the TF graph as exported by StyleGAN/EDM
(``layers.conv`` ... ``layers.mixed_10``, ``layers.pool2``, ``output``), so state dicts of those
exports load by name. Batch norm has no scale (gamma = 1) and eps = 1e-3, as in the graph; average
pools exclude the padding (TF 'SAME').

Input: float images already resized to 299 x 299 and mapped to (x - 128) / 128 (see
``relay_diffusion.metrics.detector``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2048  # pool_3 features ("feat")
NUM_CLASSES = 1008  # the graph's softmax head (1000 ImageNet classes + 8 unused)
SPATIAL_CHANNELS = 7  # "mixed_6/conv" channels kept for sFID: 7 * 17 * 17 = 2023
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17


class Conv2dLayer(nn.Module):
    """Convolution without bias, batch norm without scale (eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean.to(x.dtype), self.var.to(x.dtype), None, self.beta.to(x.dtype), False, 0.0, 1e-3)
        return F.relu(x)


def _seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(named))


def _avg_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block (graph ``mixed``, ``mixed_1``, ``mixed_2``)."""

    def __init__(self, cin: int, pool_channels: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1)
        self.tower = _seq(("conv", Conv2dLayer(cin, 48, 1)), ("conv_1", Conv2dLayer(48, 64, 5, padding=2)))
        self.tower_1 = _seq(("conv", Conv2dLayer(cin, 64, 1)), ("conv_1", Conv2dLayer(64, 96, 3, padding=1)),
                            ("conv_2", Conv2dLayer(96, 96, 3, padding=1)))
        self.tower_2 = _seq(("pool", _avg_pool()), ("conv", Conv2dLayer(cin, pool_channels, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (graph ``mixed_3``)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, stride=2)
        self.tower = _seq(("conv", Conv2dLayer(cin, 64, 1)), ("conv_1", Conv2dLayer(64, 96, 3, padding=1)),
                          ("conv_2", Conv2dLayer(96, 96, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorised 7 x 7 convolutions (graph ``mixed_4`` ... ``mixed_7``)."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(cin, 192, 1)
        self.tower = _seq(("conv", Conv2dLayer(cin, mid, 1)), ("conv_1", Conv2dLayer(mid, mid, (1, 7), padding=(0, 3))),
                          ("conv_2", Conv2dLayer(mid, 192, (7, 1), padding=(3, 0))))
        self.tower_1 = _seq(("conv", Conv2dLayer(cin, mid, 1)), ("conv_1", Conv2dLayer(mid, mid, (7, 1), padding=(3, 0))),
                            ("conv_2", Conv2dLayer(mid, mid, (1, 7), padding=(0, 3))),
                            ("conv_3", Conv2dLayer(mid, mid, (7, 1), padding=(3, 0))),
                            ("conv_4", Conv2dLayer(mid, 192, (1, 7), padding=(0, 3))))
        self.tower_2 = _seq(("pool", _avg_pool()), ("conv", Conv2dLayer(cin, 192, 1)))

    def forward_with_branch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block output and its 1 x 1 branch (``mixed_6/conv`` is the sFID layer)."""
        branch = self.conv(x)
        return torch.cat([branch, self.tower(x), self.tower_1(x), self.tower_2(x)], 1), branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_branch(x)[0]


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (graph ``mixed_8``)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _seq(("conv", Conv2dLayer(cin, 192, 1)), ("conv_1", Conv2dLayer(192, 320, 3, stride=2)))
        self.tower_1 = _seq(("conv", Conv2dLayer(cin, 192, 1)), ("conv_1", Conv2dLayer(192, 192, (1, 7), padding=(0, 3))),
                            ("conv_2", Conv2dLayer(192, 192, (7, 1), padding=(3, 0))),
                            ("conv_3", Conv2dLayer(192, 192, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 towers (graph ``mixed_9``: average pool, ``mixed_10``: max pool)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = Conv2dLayer(cin, 320, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = Conv2dLayer(cin, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = Conv2dLayer(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([
            self.conv(x),
            self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ], 1)


class InceptionV3(nn.Module):
    """The 2015-12-05 graph: ``layers`` (stem, 11 mixed blocks, 8 x 8 average pool) and an optional
    classifier ``output`` (2048 -> 1008, with bias), present when the weights carry it."""

    def __init__(self, with_head: bool = True) -> None:
        super().__init__()
        self.layers = _seq(
            ("conv", Conv2dLayer(3, 32, 3, stride=2)),
            ("conv_1", Conv2dLayer(32, 32, 3)),
            ("conv_2", Conv2dLayer(32, 64, 3, padding=1)),
            ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", Conv2dLayer(64, 80, 1)),
            ("conv_4", Conv2dLayer(80, 192, 3)),
            ("pool1", nn.MaxPool2d(3, stride=2)),
            ("mixed", InceptionA(192, 32)),
            ("mixed_1", InceptionA(256, 64)),
            ("mixed_2", InceptionA(288, 64)),
            ("mixed_3", InceptionB(288)),
            ("mixed_4", InceptionC(768, 128)),
            ("mixed_5", InceptionC(768, 160)),
            ("mixed_6", InceptionC(768, 160)),
            ("mixed_7", InceptionC(768, 192)),
            ("mixed_8", InceptionD(768)),
            ("mixed_9", InceptionE(1280, max_pool=False)),
            ("mixed_10", InceptionE(2048, max_pool=True)),
            ("pool2", nn.AvgPool2d(8, stride=8)),
        )
        self.output = nn.Linear(FEATURE_DIM, NUM_CLASSES) if with_head else None
        self.requires_grad_(False)

    @property
    def has_head(self) -> bool:
        return self.output is not None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: [N, 3, 299, 299] in (x - 128) / 128. Returns ``feat`` [N, 2048], ``s_feat`` [N, 2023]
        (first 7 channels of ``mixed_6/conv``, [N, 7, 17, 17] flattened) and, with a head, ``logits``
        [N, 1008]."""
        spatial = None
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                x, spatial = layer.forward_with_branch(x)
            else:
                x = layer(x)
        feat = x.reshape(-1, FEATURE_DIM)
        out = {"feat": feat, "s_feat": spatial[:, :SPATIAL_CHANNELS].reshape(spatial.shape[0], -1)}
        if self.output is not None:
            out["logits"] = self.logits(feat)
        return out

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """Classifier logits from pool features, [N, 2048] -> [N, 1008] (weight and bias, as the
        reference's IS; StyleGAN's IS leaves the bias out)."""
        if self.output is None:
            raise RuntimeError("this Inception network has no classifier head")
        return F.linear(feat, self.output.weight.to(feat.dtype), self.output.bias.to(feat.dtype))
