"""--runtime and a user's own .onnx encoder file through the build and evaluate jobs, VisualMemory and classify."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from pipelines import build, evaluate
from pipelines.runner import FlagError

_WEIGHTS = np.random.default_rng(3).normal(size=(8, 3, 4, 4)).astype(np.float32)  # 3 -> 8 channels, 4x4/4.


@pytest.fixture(scope="module")
def onnx_config(tmp_path_factory) -> str:
    """A config file (configs as code) selecting a tiny ONNX feature-map encoder written with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("onnx-encoder")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["map"], kernel_shape=[4, 4], strides=[4, 4])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["n", 8, 4, 4])],
        initializer=[numpy_helper.from_array(_WEIGHTS, "w")])
    model_path = str(root / "conv.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_path)
    config = root / "own.py"
    config.write_text(
        "from configs.build import BuildConfig\n"
        "from encoders.base import (EncoderKind, EncoderSpec, Layout, ModelIO, OutputKind, PreprocessSpec,\n"
        "                           ResizeMode)\n"
        "def get_config(variant=''):\n"
        f"    enc = EncoderSpec(kind=EncoderKind.MODEL_FILE, uri={model_path!r},\n"
        "                      model_io=ModelIO(layout=Layout.NCHW, output=OutputKind.SPATIAL, dim=8),\n"
        "                      preprocess=PreprocessSpec(image_size=16, resize=ResizeMode.RESIZE_SQUARE,\n"
        "                                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))\n"
        "    return BuildConfig(encoder=enc, num_shards=2, min_batch_size=4, max_batch_size=32)\n")
    return str(config)


def test_own_onnx_encoder_builds_evaluates_and_classifies(fmnist_small, onnx_config, tmp_path, capsys):
    from memory.store.versions import read_manifest
    from memory.visual_memory import VisualMemory
    from vmem.main import main as vmem_main

    mem, out = str(tmp_path / "mem"), str(tmp_path / "eval")
    build.run(["--images", os.path.join(fmnist_small, "train"), "--output", mem, "--config", onnx_config])
    manifest = read_manifest(mem)
    assert manifest.counts.embedded == 200 and manifest.dim == 8
    # The manifest records the runtime: in the spec the build ran and in the identity of what ran.
    assert manifest.build_config["encoder"]["runtime"] == "onnx"
    assert manifest.encoder["runtime"] == "onnx" and manifest.encoder["name"] == "conv"
    assert manifest.encoder["reference_deviation"] == 0.0
    assert vmem_main(["info", mem]) == 0 and "dim 8, metric cosine, runtime onnx" in capsys.readouterr().out

    evaluate.run(["--memory", mem, "--images", os.path.join(fmnist_small, "test"), "--output", out,
                  "--k-max", "5"])
    with open(os.path.join(out, "evaluation-summary.json")) as f:
        assert json.load(f)["queries"] == 50

    memory = VisualMemory.open(mem)
    test_images = sorted(glob.glob(os.path.join(fmnist_small, "test", "*", "*.png")))[:3]
    predictions = memory.classify(test_images, k=3)
    assert len(predictions) == 3
    encoder = memory.query_encoder()
    assert encoder.identity.runtime.value == "onnx"
    # The query embeddings are the memory's own: a memory image finds itself first.
    own = sorted(glob.glob(os.path.join(fmnist_small, "train", "*", "*.png")))[0]
    found = memory.search(memory.embed_images([own]), k=1)
    assert found.ids[0, 0] == os.path.relpath(own, os.path.join(fmnist_small, "train"))
    assert encoder.feature_map(np.zeros((2, 16, 16, 3), np.float32)).shape == (2, 4, 4, 8)


def test_runtime_flag_reaches_the_config_and_is_checked(onnx_config, tmp_path):
    args = build.build_arg_parser().parse_args(["--images", "x", "--output", "y", "--runtime", "onnx"])
    assert build.resolve_config(args).encoder.runtime.value == "onnx"  # The bundled encoder, on ONNX Runtime.
    args = build.build_arg_parser().parse_args(["--images", "x", "--output", "y", "--config", onnx_config,
                                                "--runtime", "litert"])
    with pytest.raises(FlagError, match=r"runs on runtime 'onnx', got runtime='litert'; pass --runtime onnx"):
        build.resolve_config(args)
    with pytest.raises(SystemExit):
        evaluate.build_arg_parser().parse_args(["--memory", "m", "--images", "x", "--output", "o",
                                                "--runtime", "jax"])


def test_memory_refuses_queries_of_a_runtime_that_disagrees(fmnist_small, onnx_config, tmp_path):
    """A memory built with one runtime, queried with an encoder of another that deviates beyond the tolerance."""
    import dataclasses

    from encoders import load_encoder
    from encoders.base import EncoderSpec, Runtime
    from memory.visual_memory import VisualMemory

    mem = str(tmp_path / "mem")
    build.run(["--images", os.path.join(fmnist_small, "test"), "--output", mem, "--config", onnx_config])
    memory = VisualMemory.open(mem)
    own = memory.query_encoder()

    class OtherRuntime:
        """The same encoder reported as run by TF with a 1e-3 deviation from the memory's runtime."""

        identity = dataclasses.replace(own.identity, runtime=Runtime.TF, reference_deviation=1e-3)
        preprocess_spec = own.preprocess_spec

        def embed(self, images):
            return own.embed(images)

    with pytest.raises(ValueError, match=r"built with runtime 'onnx' and the queries were embedded with runtime "
                                         r"'tf'.*Fix: query with --runtime onnx"):
        memory.query_encoder(OtherRuntime())
    # A model file runs on its own runtime only; asking VisualMemory for another one is refused by name.
    spec = EncoderSpec.from_dict(memory.manifest.build_config["encoder"])
    assert load_encoder(spec).identity == own.identity
    with pytest.raises(ValueError, match=r"runs on runtime 'onnx', got runtime='litert'"):
        VisualMemory.open(mem, runtime="litert").query_encoder()


def test_own_spatial_encoder_builds_a_region_memory(fmnist_small, onnx_config, tmp_path, capsys):
    """--regions pools a model file's declared spatial map (4 x 4 here): regions tied to their image, the global
    entry equal to the file's embedding, and region classify working on it."""
    from memory.regions.layout import region_grid
    from memory.store.shard import read_shard_data
    from memory.store.versions import read_manifest
    from memory.visual_memory import VisualMemory
    from vmem.main import main as vmem_main

    mem = str(tmp_path / "mem")
    build.run(["--images", os.path.join(fmnist_small, "test"), "--output", mem, "--config", onnx_config,
               "--regions", "2"])
    manifest = read_manifest(mem)
    assert region_grid(manifest) == 2 and manifest.counts.embedded == 50
    parts = [read_shard_data(os.path.join(mem, s.path)) for s in manifest.shards]
    ids = np.concatenate([p.ids for p in parts]).tolist()
    images = sorted(i for i in ids if "#r" not in i)
    assert len(images) == 50 and len(ids) == 50 * 5
    memory = VisualMemory.open(mem)
    path = os.path.join(fmnist_small, "test", images[0])
    np.testing.assert_allclose(memory.get_embeddings([images[0]]), memory.embed_images([path]), atol=1e-5)
    capsys.readouterr()
    assert vmem_main(["classify", "--memory", mem, path, "--k", "3", "--explain"]) == 0
    assert capsys.readouterr().out.count("regions (query -> neighbour, similarity)") == 3


@pytest.mark.parametrize("output, cls_token", [("pooled", False), ("tokens", True)])
def test_regions_need_an_encoder_whose_embedding_is_its_maps_mean(tmp_path, output, cls_token):
    from configs.build import BuildConfig
    from encoders.base import EncoderKind, EncoderSpec, ModelIO, PreprocessSpec
    from pipelines.io.readers import parse_image_spec

    spec = EncoderSpec(kind=EncoderKind.MODEL_FILE, uri=str(tmp_path / "own.onnx"),
                       model_io=ModelIO(output=output, cls_token=cls_token), preprocess=PreprocessSpec(image_size=16))
    assert not spec.pools_feature_map and EncoderSpec().pools_feature_map
    (tmp_path / "images").mkdir()
    with pytest.raises(FlagError, match=rf"model_io.output='{output}'.*does not; build region memories"):
        build.build_memory(source=parse_image_spec(str(tmp_path / "images")), output=str(tmp_path / "mem"),
                           config=BuildConfig(encoder=spec, regions=2))
