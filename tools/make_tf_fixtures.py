"""Write the TF-slim MobileNetV1 checkpoint fixtures of ``tests/test_tf_checkpoint.py`` with real TensorFlow.

TensorFlow is not a dependency of this package (our reader exists so that nobody needs it), so run this in a
throwaway virtual environment outside the repository, from the repository root::

    python3.11 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu   # TF 2.21.0 wrote the committed files
    /tmp/tfenv/bin/python tools/make_tf_fixtures.py                                # writes tests/fixtures/tf_slim/

Everything is deterministic (seeded NumPy draws, TF only computes), so a re-run rewrites the reference outputs
up to TensorFlow's own float rounding. What it writes into ``tests/fixtures/tf_slim/``:

``mobilenet_v1_0.25_128.ckpt.{index,data-00000-of-00002,data-00001-of-00002}``
    A name-based V2 checkpoint saved by ``tf.compat.v1.train.Saver(sharded=True)`` from a session with two CPU
    devices, the variables split between ``/cpu:0`` (stem to block 6, ``global_step``) and ``/cpu:1`` (blocks 7
    to 13, logits), hence two data shards. It holds the TF-slim variables of a depth-multiplier-0.25 MobileNetV1
    with 1001 classes (kernels, ``BatchNorm/{gamma,beta,moving_mean,moving_variance}``, logits weights and
    biases), one ``ExponentialMovingAverage`` shadow per variable that differs from the raw value, the two
    ``RMSProp`` slots of the stem's trainable variables after one optimizer step, and ``global_step``.
``mobilenet_v1_0.25_128_reference.npz``
    TensorFlow's own forward pass (``tf.nn`` ops: SAME convolutions, depthwise convolutions, inference batch norm
    with epsilon 1e-3, relu6, TF-slim's ``min(H, 7)`` VALID average pooling with stride 2, a 1x1 logits conv) on
    fixed uint8 images mapped to [-1, 1] by ``x / 127.5 - 1``: ``input_128`` (2x128x128x3, NHWC uint8) with
    ``{ema,raw}_logits_128``, ``{ema,raw}_Conv2d_13_pointwise_128`` and ``ema_Conv2d_5_pointwise_128`` (NHWC; the
    end points are the relu6 outputs of those layers), and ``input_224``
    (1x224x224x3, where the pool is the full 7x7 VALID one) with ``ema_logits_224`` and
    ``ema_Conv2d_13_pointwise_224``.
``mobilenet_v1_0.125_128_quant.ckpt.{index,data-00000-of-00001}`` and ``..._quant_frozen.pb``
    A small quantization-aware-training-style model (depth multiplier 0.125, 16 classes to stay small): the same
    float variables, no EMA, plus FakeQuant ranges ``<layer>/weights_quant/{min,max}`` and
    ``<layer>/act_quant/{min,max}`` as ``tf.contrib.quantize`` names them, and ``global_step``. BatchNorm is not
    folded into the stored variables (contrib.quantize folds it in the graph, not in the checkpoint). The
    frozen GraphDef is the fake-quantized forward graph with every variable turned into a ``Const`` by
    ``tf.compat.v1.graph_util.convert_variables_to_constants``.
``mobilenet_v1_0.125_128_quant_reference.npz``
    ``input_128`` (one image) and ``float_logits_128``: the float forward (no FakeQuant) of the quantized model's
    weights, which is what our float model must reproduce; plus ``fake_quant_logits_128`` for information.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# (depthwise stride, pointwise output channels at depth multiplier 1.0) of blocks 1..13: the paper's Table 1.
_BLOCKS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)] + [(1, 512)] * 5 + [(2, 1024), (1, 1024)]
# (scope, kind, stride, output channels at depth multiplier 1.0, -1 for depthwise): TF-slim's scopes.
LAYERS: list[tuple[str, str, int, int]] = [("Conv2d_0", "conv", 2, 32)]
for _k, (_stride, _channels) in enumerate(_BLOCKS, start=1):
    LAYERS.append((f"Conv2d_{_k}_depthwise", "depthwise", _stride, -1))
    LAYERS.append((f"Conv2d_{_k}_pointwise", "pointwise", 1, _channels))

SCOPE = "MobilenetV1"
LOGITS = "Logits/Conv2d_1c_1x1"
BN_EPS = 1e-3
MIN_DEPTH = 8
END_POINTS = ("Conv2d_5_pointwise", "Conv2d_13_pointwise")


def _depth(channels: int, multiplier: float) -> int:
    return max(int(channels * multiplier), MIN_DEPTH)


def fixed_images(batch: int, size: int, seed: int) -> np.ndarray:
    """Deterministic uint8 NHWC images: smooth colour gradients plus seeded noise, so nothing is saturated."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    images = []
    for b in range(batch):
        base = np.stack([xx, yy, (xx + yy) / 2][b % 3 :] + [xx, yy, (xx + yy) / 2][: b % 3], axis=-1) * 200 + 20
        noise = rng.normal(0, 25, size=(size, size, 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return np.stack(images)


def to_float(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def forward(x, get, *, fake_quant: bool = False, end_points: dict | None = None):
    """TF-slim MobileNetV1 inference with plain ``tf.nn`` ops; ``get(name)`` returns a variable's value.

    With ``fake_quant`` the kernels and activations go through ``fake_quant_with_min_max_vars`` using the
    ``weights_quant`` / ``act_quant`` ranges.
    """
    net = x
    for scope, kind, stride, _ in LAYERS:
        kernel = get(f"{scope}/{'depthwise_weights' if kind == 'depthwise' else 'weights'}")
        if fake_quant:
            kernel = tf.quantization.fake_quant_with_min_max_vars(
                kernel, get(f"{scope}/weights_quant/min"), get(f"{scope}/weights_quant/max"), narrow_range=True
            )
        if kind == "depthwise":
            net = tf.nn.depthwise_conv2d(net, kernel, [1, stride, stride, 1], "SAME")
        else:
            net = tf.nn.conv2d(net, kernel, [1, stride, stride, 1], "SAME")
        net = tf.nn.batch_normalization(
            net,
            get(f"{scope}/BatchNorm/moving_mean"),
            get(f"{scope}/BatchNorm/moving_variance"),
            get(f"{scope}/BatchNorm/beta"),
            get(f"{scope}/BatchNorm/gamma"),
            BN_EPS,
        )
        net = tf.nn.relu6(net)
        if fake_quant:
            net = tf.quantization.fake_quant_with_min_max_vars(
                net, get(f"{scope}/act_quant/min"), get(f"{scope}/act_quant/max")
            )
        if end_points is not None:
            end_points[scope] = net
    # TF-slim's _reduced_kernel_size_for_small_input: a min(H, 7) x min(W, 7) window, slim's default stride 2.
    height, width = int(net.shape[1]), int(net.shape[2])
    kernel_size = [1, min(height, 7), min(width, 7), 1]
    net = tf.nn.avg_pool2d(net, kernel_size, [1, 2, 2, 1], "VALID")
    weights = get(f"{LOGITS}/weights")
    if fake_quant:
        weights = tf.quantization.fake_quant_with_min_max_vars(
            weights, get(f"{LOGITS}/weights_quant/min"), get(f"{LOGITS}/weights_quant/max"), narrow_range=True
        )
    logits = tf.nn.bias_add(tf.nn.conv2d(net, weights, [1, 1, 1, 1], "VALID"), get(f"{LOGITS}/biases"))
    return tf.squeeze(logits, [1, 2], name="SpatialSqueeze")


def random_float_params(multiplier: float, num_classes: int, calibration: np.ndarray, seed: int) -> dict:
    """Random slim variables whose BatchNorm statistics are near the real ones on ``calibration``.

    Moving statistics taken from the data (then jittered) keep every layer's activations in relu6's linear
    range, so the comparison is not hidden by saturated or dead units. Computed eagerly with TF itself.
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    net = tf.constant(calibration)
    in_channels = 3
    for scope, kind, stride, base in LAYERS:
        if kind == "depthwise":
            out_channels = in_channels
            kernel = rng.normal(0, np.sqrt(2 / 9), (3, 3, in_channels, 1)).astype(np.float32)
            params[f"{scope}/depthwise_weights"] = kernel
            net = tf.nn.depthwise_conv2d(net, kernel, [1, stride, stride, 1], "SAME")
        else:
            out_channels = _depth(base, multiplier)
            size = 3 if kind == "conv" else 1
            fan_in = size * size * in_channels
            kernel = rng.normal(0, np.sqrt(2 / fan_in), (size, size, in_channels, out_channels)).astype(np.float32)
            params[f"{scope}/weights"] = kernel
            net = tf.nn.conv2d(net, kernel, [1, stride, stride, 1], "SAME")
        mean, variance = (t.numpy() for t in tf.nn.moments(net, axes=[0, 1, 2]))
        std = np.sqrt(variance)
        bn = {
            "moving_mean": mean + rng.normal(0, 0.1, out_channels) * std,
            "moving_variance": variance * rng.uniform(0.8, 1.25, out_channels) + 1e-3,
            "gamma": rng.uniform(0.6, 1.4, out_channels),
            "beta": rng.normal(1.0, 0.5, out_channels),
        }
        for name, value in bn.items():
            params[f"{scope}/BatchNorm/{name}"] = value.astype(np.float32)
        net = tf.nn.relu6(
            tf.nn.batch_normalization(
                net,
                params[f"{scope}/BatchNorm/moving_mean"],
                params[f"{scope}/BatchNorm/moving_variance"],
                params[f"{scope}/BatchNorm/beta"],
                params[f"{scope}/BatchNorm/gamma"],
                BN_EPS,
            )
        )
        in_channels = out_channels
    params[f"{LOGITS}/weights"] = rng.normal(0, np.sqrt(1 / in_channels), (1, 1, in_channels, num_classes)).astype(
        np.float32
    )
    params[f"{LOGITS}/biases"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return params


def _device_for(name: str) -> str:
    """Stem to block 6 on the first CPU, the rest on the second: two devices give two checkpoint shards."""
    if name.startswith("Logits"):
        return "/cpu:1"
    block = int(name.split("/")[0].split("_")[1])
    return "/cpu:0" if block <= 6 else "/cpu:1"


def _session_config():
    return tf.compat.v1.ConfigProto(device_count={"CPU": 2}, allow_soft_placement=False)


def write_float_checkpoint(out: Path) -> None:
    prefix = out / "mobilenet_v1_0.25_128.ckpt"
    input_128 = fixed_images(2, 128, seed=1)
    input_224 = fixed_images(1, 224, seed=2)
    params = random_float_params(0.25, 1001, to_float(input_128), seed=0)
    rng = np.random.default_rng(3)

    graph = tf.Graph()
    with graph.as_default():
        variables: dict[str, tf.Variable] = {}
        with tf.compat.v1.variable_scope(SCOPE):
            for name, value in params.items():
                with tf.device(_device_for(name)):
                    variables[name] = tf.compat.v1.get_variable(name, initializer=tf.constant(value))
        with tf.device("/cpu:0"):
            global_step = tf.compat.v1.train.get_or_create_global_step()
        # Shadows start at the initial values; after the raw variables move, one update puts them halfway.
        ema = tf.compat.v1.train.ExponentialMovingAverage(decay=0.5)
        ema_update = ema.apply(list(variables.values()))

        # Static spatial sizes: TF-slim's pooling window depends on them.
        x = tf.compat.v1.placeholder(tf.float32, [None, 128, 128, 3])
        raw_ends: dict = {}
        raw_logits = forward(x, lambda n: variables[n], end_points=raw_ends)
        ema_ends: dict = {}
        ema_logits = forward(x, lambda n: ema.average(variables[n]), end_points=ema_ends)
        x_224 = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        ema_ends_224: dict = {}
        ema_logits_224 = forward(x_224, lambda n: ema.average(variables[n]), end_points=ema_ends_224)

        # One RMSProp step on the stem's trainable variables creates the optimizer slots and bumps global_step.
        stem = [variables[n] for n in ("Conv2d_0/weights", "Conv2d_0/BatchNorm/gamma", "Conv2d_0/BatchNorm/beta")]
        loss = tf.reduce_mean(tf.square(raw_logits))
        with tf.device("/cpu:0"):
            train = tf.compat.v1.train.RMSPropOptimizer(0.01, momentum=0.9).minimize(
                loss, var_list=stem, global_step=global_step
            )
        perturb = [
            v.assign(v * rng.uniform(0.9, 1.1, v.shape.as_list()).astype(np.float32)) for v in variables.values()
        ]
        saver = tf.compat.v1.train.Saver(sharded=True)
        with tf.compat.v1.Session(graph=graph, config=_session_config()) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(train, {x: to_float(input_128)})
            sess.run(perturb)
            sess.run(ema_update)
            saved = saver.save(sess, str(prefix), write_meta_graph=False, write_state=False)
            # The raw run keeps only the logits and the last end point: the files stay small.
            fetches = {
                "ema_logits": ema_logits,
                "raw_logits": raw_logits,
                **{f"ema_{e}": ema_ends[e] for e in END_POINTS},
                "raw_Conv2d_13_pointwise": raw_ends["Conv2d_13_pointwise"],
            }
            out_128 = sess.run(fetches, {x: to_float(input_128)})
            out_224 = sess.run(
                {"ema_logits": ema_logits_224, "ema_Conv2d_13_pointwise": ema_ends_224["Conv2d_13_pointwise"]},
                {x_224: to_float(input_224)},
            )
            devices = sorted({v.device for v in variables.values()})
    np.savez(
        out / "mobilenet_v1_0.25_128_reference.npz",
        input_128=input_128,
        input_224=input_224,
        **{f"{k}_128": v for k, v in out_128.items()},
        **{f"{k}_224": v for k, v in out_224.items()},
    )
    print(f"wrote {saved} (variables on {devices})")


def write_quant_checkpoint(out: Path) -> None:
    prefix = out / "mobilenet_v1_0.125_128_quant.ckpt"
    input_128 = fixed_images(1, 128, seed=4)
    params = random_float_params(0.125, 16, to_float(input_128), seed=5)
    # FakeQuant ranges: weight ranges from the kernels, activation ranges from a float pass on the same images.
    ends: dict = {}
    forward(tf.constant(to_float(input_128)), lambda n: params[n], end_points=ends)
    ranges: dict[str, np.ndarray] = {}
    for scope, kind, _, _ in LAYERS:
        kernel = params[f"{scope}/{'depthwise_weights' if kind == 'depthwise' else 'weights'}"]
        ranges[f"{scope}/weights_quant/min"] = np.float32(min(kernel.min(), 0.0))
        ranges[f"{scope}/weights_quant/max"] = np.float32(max(kernel.max(), 0.0))
        ranges[f"{scope}/act_quant/min"] = np.float32(0.0)
        ranges[f"{scope}/act_quant/max"] = np.float32(ends[scope].numpy().max())
    kernel = params[f"{LOGITS}/weights"]
    ranges[f"{LOGITS}/weights_quant/min"] = np.float32(kernel.min())
    ranges[f"{LOGITS}/weights_quant/max"] = np.float32(kernel.max())

    graph = tf.Graph()
    with graph.as_default():
        variables: dict[str, tf.Variable] = {}
        with tf.compat.v1.variable_scope(SCOPE):
            for name, value in {**params, **ranges}.items():
                variables[name] = tf.compat.v1.get_variable(name, initializer=tf.constant(value))
        global_step = tf.compat.v1.train.get_or_create_global_step()
        x = tf.compat.v1.placeholder(tf.float32, [None, 128, 128, 3], name="input")
        with tf.name_scope(SCOPE):
            quant_logits = forward(x, lambda n: variables[n], fake_quant=True)
            output = tf.identity(quant_logits, name="Predictions")
        float_logits = forward(x, lambda n: variables[n])
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(global_step.assign(1234))
            saved = saver.save(sess, str(prefix), write_meta_graph=False, write_state=False)
            feed = {x: to_float(input_128)}
            fake_quant_out, float_out = sess.run([quant_logits, float_logits], feed)
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                sess, graph.as_graph_def(), [output.op.name]
            )
    (out / "mobilenet_v1_0.125_128_quant_frozen.pb").write_bytes(frozen.SerializeToString())
    np.savez(
        out / "mobilenet_v1_0.125_128_quant_reference.npz",
        input_128=input_128,
        float_logits_128=float_out,
        fake_quant_logits_128=fake_quant_out,
    )
    print(f"wrote {saved} and its frozen graph")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/tf_slim")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.ckpt*"):
        stale.unlink()
    print(f"TensorFlow {tf.__version__}, NumPy {np.__version__}")
    write_float_checkpoint(args.out)
    write_quant_checkpoint(args.out)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"fixtures in {args.out}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
