"""COCO detection demo for the MobileNetV1 backbone.

`python -m detection_demo` generates a synthetic COCO-format dataset (`synthetic`), trains an SSDLite/FPN
detector with a MobileNetV1 backbone on it, evaluates it with pycocotools and draws its predictions. `data`
holds the dataset, the transforms, the collate function and the COCO evaluation helpers the training loop uses.
"""
