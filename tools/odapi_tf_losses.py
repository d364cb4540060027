"""Print the OD-API's own training losses (real TensorFlow) on the OD-API fixtures, for tests/test_odapi.py.

A maintainer tool, run in the throwaway TensorFlow environment of tools/make_odapi_fixtures.py (see its docstring):

    /tmp/tfenv/bin/python tools/odapi_tf_losses.py

For each case of tests/fixtures/odapi/ it builds the model from the case's pipeline.config with the OD-API's
`model_builder` (through make_odapi_fixtures' TF 1.x shim; the legacy case with its anchor-order patch), restores
the case's checkpoint, runs `predict` on TF's own preprocessed photos from reference.npz, gives it the ground truth
below with `provide_groundtruth`, and prints `model.loss(...)`: matcher, target assigner, the configured
classification/localization losses, hard example mining and normalisation, all OD-API code. The numbers are copied
into `TF_LOSSES` in tests/test_odapi.py, which checks `ODAPISSDDetector.loss_on_batch` against them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# Normalised (ymin, xmin, ymax, xmax) boxes and 1-based labels per photo; the same constants are in the test.
GROUNDTRUTH = {
    "boxes": [[[0.1, 0.2, 0.5, 0.6], [0.4, 0.1, 0.9, 0.45], [0.05, 0.7, 0.3, 0.98]], [[0.2, 0.3, 0.7, 0.9]]],
    "labels": [[1, 3, 2], [2]],
}
CASES = ("ssd_k1_sigmoid", "ssd_k3_legacy_explicit_depthwise_softmax", "fpn_shared", "ssd_quantized")


def tf_losses(case: str, tf) -> dict[str, float]:
    import make_odapi_fixtures as fixtures
    from google.protobuf import text_format
    from object_detection.anchor_generators import multiple_grid_anchor_generator as mgag
    from object_detection.builders import model_builder
    from object_detection.protos import pipeline_pb2

    folder = ROOT / "tests" / "fixtures" / "odapi" / case
    pipeline = pipeline_pb2.TrainEvalPipelineConfig()
    text_format.Merge((folder / "pipeline.config").read_text(), pipeline)
    reference = np.load(folder / "reference.npz")
    batch = np.concatenate([reference["preprocessed_0"], reference["preprocessed_1"]])
    size = batch.shape[1]
    original = fixtures._legacy_anchor_patch(mgag) if "legacy" in case else None
    try:
        graph = tf.Graph()
        with graph.as_default():
            model = model_builder.build(pipeline.model, is_training=False)
            shapes = tf.constant([[size, size, 3]] * len(batch), tf.int32)
            predictions = model.predict(tf.constant(batch), shapes)
            model.provide_groundtruth(
                [tf.constant(np.array(b, np.float32)) for b in GROUNDTRUTH["boxes"]],
                [tf.one_hot(np.array(c) - 1, model.num_classes) for c in GROUNDTRUTH["labels"]],
            )
            losses = model.loss(predictions, shapes)
            with tf.Session(graph=graph) as sess:
                tf.train.Saver().restore(sess, str(folder / "model.ckpt"))
                values = sess.run(losses)
    finally:
        if original is not None:
            mgag.create_ssd_anchors = original
    return {key.split("/")[-1]: float(value) for key, value in values.items()}


def main() -> None:
    import make_odapi_fixtures as fixtures

    tf, _ = fixtures.install_tf1_shim()
    print(json.dumps({case: tf_losses(case, tf) for case in CASES}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
