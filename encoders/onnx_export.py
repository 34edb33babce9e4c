"""A Keras functional convolutional model as an ONNX graph, written with ``onnx.helper`` (no tf2onnx).

Covers the layers the bundled EfficientNet-Lite models are made of: ``Conv2D``, ``DepthwiseConv2D``,
``BatchNormalization``, ``ReLU`` (with ``max_value``), ``Add``, ``GlobalAveragePooling2D`` and ``Dense``.
A batch norm that follows a bias-free convolution read by nothing else is folded into that convolution's
weights and bias (inference only), so the graph runs one fused op per convolution. The graph takes and
returns NHWC tensors, like the Keras model: it transposes to ONNX's NCHW after the input and back before a
4-d output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_OPSET = 17
_NCHW = [0, 3, 1, 2]
_NHWC = [0, 2, 3, 1]


class _Graph:
    """Nodes and initializers under construction; names are the Keras layer names."""

    def __init__(self):
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        """Adds one node; its output tensor is ``output + "/out"`` so graph outputs can take layer names."""
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output + "/out"], name=output, **attrs))
        return output + "/out"


def _inbound(layer_config: dict) -> list[str]:
    """Names of the layers whose outputs ``layer_config``'s layer reads (Keras 3 functional config)."""
    names = []
    for node in layer_config["inbound_nodes"]:
        for arg in node["args"]:
            for tensor in arg if isinstance(arg, list) else [arg]:
                names.append(tensor["config"]["keras_history"][0])
    return names


def _folded(kernel: np.ndarray, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """OIHW ``kernel`` and a bias with the batch norm ``bn`` (a Keras layer) folded in."""
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    return kernel * scale[:, None, None, None], beta - mean * scale


def keras_to_onnx(model: Any, *, outputs: list[str]) -> Any:
    """Converts a Keras functional model to an ``onnx.ModelProto`` with the given layers' outputs.

    Args:
        model: A built Keras 3 functional model of the supported layers, one NHWC float32 image input.
        outputs: Names of the layers whose outputs the graph returns, in that order.

    Returns:
        The ONNX model: input ``images`` float32 ``[N, H, W, 3]``; each output named after its layer (a 4-d
        one NHWC).

    Raises:
        ValueError: a layer type the converter does not know, or an output name that is not a layer.
    """
    from onnx import TensorProto, checker, helper

    configs = model.get_config()["layers"]
    consumers: dict[str, int] = {}
    for c in configs:
        for name in _inbound(c):
            consumers[name] = consumers.get(name, 0) + 1
    by_name = {c["name"]: c for c in configs}
    unknown = [o for o in outputs if o not in by_name]
    if unknown:
        raise ValueError(f"outputs {unknown} are not layers of {model.name}; layers: {sorted(by_name)}")
    g = _Graph()
    tensor: dict[str, str] = {}  # Keras layer name -> ONNX tensor holding its output (NCHW when 4-d).
    folded: set[str] = set()
    for c in configs:
        kind, name = c["class_name"], c["name"]
        layer = model.get_layer(name)
        inputs = [tensor[i] for i in _inbound(c)]
        if kind == "InputLayer":
            tensor[name] = g.node("Transpose", ["images"], name + "_nchw", perm=_NCHW)
        elif kind in ("Conv2D", "DepthwiseConv2D"):
            weights = layer.get_weights()
            if kind == "Conv2D":
                kernel, group = weights[0].transpose(3, 2, 0, 1), 1  # HWIO -> OIHW
            else:
                kernel = weights[0].transpose(2, 3, 0, 1)  # [kh, kw, C, 1] -> [C, 1, kh, kw]
                group = kernel.shape[0]
            bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[0])
            follower = next((f for f in configs if _inbound(f) == [name]), None)
            if (len(weights) == 1 and follower is not None and follower["class_name"] == "BatchNormalization"
                    and consumers.get(name) == 1):
                kernel, bias = _folded(kernel, model.get_layer(follower["name"]))
                folded.add(follower["name"])
            # SAME_UPPER pads total // 2 before and the rest after, as TF's "same" does.
            tensor[name] = g.node("Conv", [inputs[0], g.constant(name + "_w", kernel), g.constant(name + "_b", bias)],
                                  name, group=group, kernel_shape=list(kernel.shape[2:]),
                                  strides=list(layer.strides), auto_pad="SAME_UPPER")
        elif kind == "BatchNormalization":
            if name in folded:
                tensor[name] = inputs[0]
                continue
            gamma, beta, mean, var = layer.get_weights()
            tensor[name] = g.node("BatchNormalization", [inputs[0]] + [
                g.constant(f"{name}_{k}", v) for k, v in (("g", gamma), ("b", beta), ("m", mean), ("v", var))],
                name, epsilon=float(layer.epsilon))
        elif kind == "ReLU":
            cap = layer.max_value
            high = [g.constant(name + "_max", np.array(cap))] if cap is not None else []
            tensor[name] = g.node("Clip", [inputs[0], g.constant(name + "_min", np.array(0.0))] + high, name)
        elif kind == "Add":
            tensor[name] = g.node("Add", inputs, name)
        elif kind == "GlobalAveragePooling2D":
            tensor[name] = g.node("ReduceMean", [inputs[0]], name, axes=[2, 3], keepdims=0)
        elif kind == "Dense":
            kernel, bias = layer.get_weights()
            tensor[name] = g.node("Gemm", [inputs[0], g.constant(name + "_w", kernel), g.constant(name + "_b", bias)],
                                  name)
        else:
            raise ValueError(f"layer {name!r} of type {kind} has no ONNX conversion; supported: Conv2D, "
                             "DepthwiseConv2D, BatchNormalization, ReLU, Add, GlobalAveragePooling2D, Dense")
    graph_outputs = []
    for out in outputs:
        rank = len(model.get_layer(out).output.shape)
        if rank == 4:
            g.nodes.append(helper.make_node("Transpose", [tensor[out]], [out], name=out + "_nhwc", perm=_NHWC))
        else:
            g.nodes.append(helper.make_node("Identity", [tensor[out]], [out], name=out + "_output"))
        graph_outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * rank))
    graph = helper.make_graph(
        g.nodes, model.name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, None, None, 3])],
        graph_outputs, initializer=g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    checker.check_model(onnx_model)
    return onnx_model

