"""MobileNetV1 in torchvision's detectors: SSDLite and the FPN family (Faster/Mask R-CNN, RetinaNet, FCOS).

The only part of the package that imports `torchvision.models.detection`. Builders follow torchvision's own
(keyword-only `weights`, `weights_backbone`, `num_classes`, `trainable_backbone_layers`, `**kwargs`
forwarded to the detector). One home per piece: `ssdlite` (SSDLite recipe, the exportable `SSDNetwork` and
`decode_ssd`), `fpn` (the pyramid and the FPN detectors), `builders` (what every builder shares: argument
checks, backbone weights, detector weights); the TF Object Detection API import adds its own modules beside
them. Every public name is importable from `mnv1_backbone.detection`.
"""

from .builders import NUM_STAGES, BackboneWeights
from .fpn import (
    MobileNetV1FPN,
    fasterrcnn_mobilenet_v1_fpn,
    fcos_mobilenet_v1_fpn,
    maskrcnn_mobilenet_v1_fpn,
    mobilenet_v1_fpn_backbone,
    retinanet_mobilenet_v1_fpn,
)
from .odapi import from_tf_object_detection as from_tf_object_detection  # TF OD-API import (issue 12)
from .ssdlite import (
    SSDLITE_EXTRA_CHANNELS,
    SSDLiteFeatureExtractor,
    SSDNetwork,
    decode_ssd,
    ssdlite320_mobilenet_v1,
    ssdlite_extra_block,
    ssdlite_mobilenet_v1,
)

__all__ = [
    "NUM_STAGES",
    "BackboneWeights",
    "SSDLITE_EXTRA_CHANNELS",
    "MobileNetV1FPN",
    "SSDLiteFeatureExtractor",
    "SSDNetwork",
    "decode_ssd",
    "fasterrcnn_mobilenet_v1_fpn",
    "fcos_mobilenet_v1_fpn",
    "maskrcnn_mobilenet_v1_fpn",
    "mobilenet_v1_fpn_backbone",
    "retinanet_mobilenet_v1_fpn",
    "ssdlite320_mobilenet_v1",
    "ssdlite_extra_block",
    "ssdlite_mobilenet_v1",
]
