"""The pretrained networks FID reads features from, built from MONAI's ResNet so that the released weight files load
into them as they are (the same parameter names and shapes).

Both follow the torch-hub entries of Project-MONAI/perceptual-models (``hubconf.py``), which MONAI's
``PerceptualLoss`` also fetches; what those entries build differs from MONAI's ``ResNet`` in a few settings,
applied here after building it:

- MedicalNet (Chen et al., Med3D, arXiv:1904.00625; ``medicalnet/resnet.py``): a 3D ResNet whose last two stages
  keep the resolution and dilate instead (``layer3``: stride 1, dilation 2; ``layer4``: stride 1, dilation 4), where
  MONAI's ResNet strides by 2. Same parameters, so the file loads either way, but only the dilated network computes
  MedicalNet's features. (MONAI's own ``resnet10(pretrained=True)`` loads the weights without the dilation.)
- RadImageNet ResNet-50 (Mei et al., Radiol. Artif. Intell. 2022; ``radimagenet/resnet.py``, ported from Keras):
  a 2D ResNet-50 whose bottleneck strides in its first 1x1 convolution (not the 3x3), with a bias on every
  convolution and BatchNorm epsilon 1.001e-5. MONAI's ResNet takes the block class as an argument
  (:class:`KerasBottleneck` here); its stem convolution is replaced by one with a bias.

Neither has a classifier: MONAI's ResNet with ``feed_forward=False`` ends in a global average pool, the spatial
average of the last feature map that FID reads (MONAI's generative tutorials and MAISI's FID script average the hub
network's feature map the same way).

``widen_factor`` (MONAI's: every stage's width times it; the released networks are 1) builds the same layout
narrower, with the same parameter names: what the tests save as a released file that a CPU reads in seconds.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv, Norm
from monai.networks.nets.resnet import ResNet
from torch import nn

__all__ = ["MEDICALNET_DEPTHS", "STAGE_WIDTHS", "KerasBottleneck", "medicalnet_resnet", "radimagenet_resnet50"]

# MedicalNet depth -> MONAI's block and blocks per stage (the hub's ResNet(BasicBlock, [1, 1, 1, 1]) and
# ResNet(Bottleneck, [3, 4, 6, 3])).
MEDICALNET_DEPTHS = {10: ("basic", [1, 1, 1, 1]), 50: ("bottleneck", [3, 4, 6, 3])}
# MedicalNet's third and fourth stages: stride 1 and this dilation (medicalnet/resnet.py, ResNet.__init__).
MEDICALNET_DILATIONS = {"layer3": 2, "layer4": 4}
# The released networks' stage widths (a bottleneck's output is 4 times its width).
STAGE_WIDTHS = (64, 128, 256, 512)
# Keras' BatchNormalization epsilon, which the RadImageNet port keeps.
KERAS_BATCHNORM_EPS = 1.001e-5


def _widths(widen_factor: float) -> list[int]:
    """The four stages' widths of the released networks (64, 128, 256, 512) times ``widen_factor``."""
    widths = [int(width * widen_factor) for width in STAGE_WIDTHS]
    if min(widths) < 1:
        raise ValueError(f"widen_factor {widen_factor}: leaves a stage of {STAGE_WIDTHS} without channels")
    return widths


def medicalnet_resnet(depth: int, widen_factor: float = 1.0) -> ResNet:
    """MedicalNet's 3D ResNet (one input channel, no classifier), as perceptual-models' ``medicalnet_resnet<depth>_23
    datasets`` builds it: output (N, 512) features for depth 10, (N, 2048) for depth 50.

    Args:
        depth: 10 or 50 (the two MedicalNet networks the hub serves).
        widen_factor: every stage's width times this (1: the released network).

    Raises:
        ValueError: another depth, or a width factor that leaves a stage without channels.
    """
    if depth not in MEDICALNET_DEPTHS:
        raise ValueError(f"MedicalNet depth {depth}: expected one of {sorted(MEDICALNET_DEPTHS)}")
    block, layers = MEDICALNET_DEPTHS[depth]
    network = ResNet(block=block, layers=layers, block_inplanes=_widths(widen_factor), spatial_dims=3,
                     n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=False,
                     feed_forward=False)
    for name, dilation in MEDICALNET_DILATIONS.items():
        for module in getattr(network, name).modules():
            if isinstance(module, nn.Conv3d):
                module.stride = (1, 1, 1)
                if module.kernel_size[0] == 3:
                    module.dilation = module.padding = (dilation,) * 3
    return network.eval()


class KerasBottleneck(nn.Module):
    """RadImageNet's ResNet-50 bottleneck (Keras' ResNet50 v1 as ported to PyTorch): the stride in the first 1x1
    convolution, a bias on every convolution, BatchNorm epsilon 1.001e-5. Takes the arguments MONAI's ``ResNet``
    passes its ``block``.

    Args:
        in_planes: input channels.
        planes: the bottleneck's width (output channels are ``planes * 4``).
        spatial_dims: 2 for RadImageNet.
        stride: the first convolution's stride.
        downsample: the shortcut's projection (MONAI's ResNet builds it), or None for the identity.
        norm: ignored (always BatchNorm, as the released weights need); MONAI's ResNet passes it.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, spatial_dims: int = 2, stride: int = 1, *,
                 downsample: nn.Module | None = None, norm: str | tuple = "batch") -> None:
        super().__init__()
        conv, batch_norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        self.conv1 = conv(in_planes, planes, kernel_size=1, stride=stride, bias=True)
        self.bn1 = batch_norm(planes, eps=KERAS_BATCHNORM_EPS)
        self.conv2 = conv(planes, planes, kernel_size=3, padding=1, bias=True)
        self.bn2 = batch_norm(planes, eps=KERAS_BATCHNORM_EPS)
        self.conv3 = conv(planes, planes * self.expansion, kernel_size=1, bias=True)
        self.bn3 = batch_norm(planes * self.expansion, eps=KERAS_BATCHNORM_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def radimagenet_resnet50(widen_factor: float = 1.0) -> ResNet:
    """RadImageNet's 2D ResNet-50 (three input channels, no classifier), as perceptual-models'
    ``radimagenet_resnet50`` builds it: output (N, 2048) features, the spatial average of its last feature map.

    Args:
        widen_factor: every stage's width times this (1: the released network).

    Raises:
        ValueError: a width factor that leaves a stage without channels.
    """
    widths = _widths(widen_factor)
    network = ResNet(block=KerasBottleneck, layers=[3, 4, 6, 3], block_inplanes=widths, spatial_dims=2,
                     n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=True,
                     feed_forward=False)
    network.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=True)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = KERAS_BATCHNORM_EPS
    return network.eval()
