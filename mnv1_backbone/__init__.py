"""mnv1_backbone: MobileNetV1 for PyTorch.

A detection-ready backbone with declared feature metadata, output stride by dilation and freezing;
a classifier weight-compatible with Hugging Face's MobileNetV1; and readers for Google's TF weights.
"""

from .backbone import FeatureInfo, MobileNetV1Backbone
from .classification import ClassifierOutput, MobileNetV1ForImageClassification, MobileNetV1Model, ModelOutput
from .config import MobileNetV1Config
from .errors import StateDictMismatchError, WeightsFormatError
from .image_processing import MobileNetV1ImageProcessor, post_process_image_classification
from .inference import optimize_for_inference
from .labels import imagenet_id2label, imagenet_labels
from .quantization import quantize_int8

__version__ = "0.1.0"

__all__ = [
    "ClassifierOutput",
    "FeatureInfo",
    "MobileNetV1Backbone",
    "MobileNetV1Config",
    "MobileNetV1ForImageClassification",
    "MobileNetV1ImageProcessor",
    "MobileNetV1Model",
    "ModelOutput",
    "StateDictMismatchError",
    "WeightsFormatError",
    "__version__",
    "imagenet_id2label",
    "imagenet_labels",
    "optimize_for_inference",
    "post_process_image_classification",
    "quantize_int8",
]
