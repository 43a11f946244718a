"""The student as ONNX, fp32 and int8, built from its weights by the platform's own code.

Why build the graph here rather than convert the SavedModel (tf2onnx) or the Hugging Face folder
(torch.onnx): the weights are already in hand as numpy arrays under Google's names, BERT is a
few dozen operators per layer, and writing them takes well under a second with neither
TensorFlow nor torch loaded (0.8 s for the demo student, where tf2onnx took 55.8 s with the same
logits: bench/onnx_export.py; torch would put 750 MB in the pipeline image). The graph uses only
standard ONNX operators (opset 17), laid out as the exporters lay BERT out, so ONNX Runtime's
optimisers recognise its attention, LayerNorm and GELU (the transformer optimiser fuses all three
attention blocks of the demo student).

Inputs: input_ids, attention_mask, token_type_ids (int64 [batch, length], Hugging Face's names)
and masked_positions (int64 [batch, positions]); outputs mlm_logits [batch, positions, vocab] and
nsp_logits [batch, 2]. The masked-LM head runs at the asked positions only: a fill-mask request
needs one row of the 30,522-word projection, not one per token (at 64 tokens that projection is
twice the work of a 3-layer encoder). Pass every position to get logits everywhere.

int8: ONNX Runtime's dynamic quantiser (int8 weights per channel, activations quantised per
call) turns each weight MatMul into an integer one; the VNNI instructions of current x86 CPUs
run those at several times fp32's rate.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from bertdistill.bert.config import BertConfig

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "masked_positions")
FOLDER, FP32, INT8 = "onnx", "model.onnx", "model.int8.onnx"  # evaluate writes FOLDER/, publish ships it


class _Graph:
    """Nodes and initializers under unique names; each op returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self._names:  # a shared scalar
            return name
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, kind: str, *inputs: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        self._count += 1
        out = f"{kind.lower()}_{self._count}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], name=f"{kind}_{self._count}", domain=domain,
                                           **attrs))
        return out

    def dense(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        kernel = self.const(f"{prefix}/kernel", weights[f"{prefix}/kernel"])
        return self.op("Add", self.op("MatMul", x, kernel), self.const(f"{prefix}/bias", weights[f"{prefix}/bias"]))

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], prefix: str, eps: float) -> str:
        return self.op("LayerNormalization", x, self.const(f"{prefix}/gamma", weights[f"{prefix}/gamma"]),
                       self.const(f"{prefix}/beta", weights[f"{prefix}/beta"]), axis=-1, epsilon=eps)

    def gelu(self, x: str, act: str) -> str:
        if act == "relu":
            return self.op("Relu", x)
        if act == "gelu":  # 0.5 x (1 + erf(x / sqrt 2)): the pattern ONNX Runtime fuses into Gelu
            erf = self.op("Erf", self.op("Div", x, self.const("sqrt2", np.float32(math.sqrt(2)))))
            one = self.op("Add", erf, self.const("one_f", np.float32(1.0)))
            return self.op("Mul", self.op("Mul", x, one), self.const("half", np.float32(0.5)))
        # the tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = self.op("Pow", x, self.const("three", np.float32(3.0)))
        inner = self.op("Add", x, self.op("Mul", cube, self.const("gelu_c", np.float32(0.044715))))
        tanh = self.op("Tanh", self.op("Mul", inner, self.const("gelu_k",
                                                                  np.float32(math.sqrt(2 / math.pi)))))
        one = self.op("Add", tanh, self.const("one_f", np.float32(1.0)))
        return self.op("Mul", self.op("Mul", x, one), self.const("half", np.float32(0.5)))


def build(config: BertConfig, weights: dict[str, np.ndarray]):
    """The student (encoder, masked-LM head at masked_positions, next-sentence head) as an onnx.ModelProto."""
    from onnx import TensorProto, helper

    g = _Graph()
    H, heads, size, eps = config.hidden_size, config.num_attention_heads, config.head_size, config.layer_norm_eps
    i64 = np.int64
    ids, mask, types, positions = INPUTS
    length = g.op("Slice", g.op("Shape", ids), g.const("one_1d", np.array([1], i64)),
                  g.const("two_1d", np.array([2], i64)))
    x = g.op("Add", g.op("Add", g.op("Gather", g.const("bert/embeddings/word_embeddings",
                                                       weights["bert/embeddings/word_embeddings"]), ids),
                         g.op("Gather", g.const("bert/embeddings/token_type_embeddings",
                                                weights["bert/embeddings/token_type_embeddings"]), types)),
             g.op("Slice", g.const("bert/embeddings/position_embeddings",
                                   weights["bert/embeddings/position_embeddings"]),
                  g.const("zero_1d", np.array([0], i64)), length, g.const("zero_1d", np.array([0], i64))))
    x = g.layer_norm(x, weights, "bert/embeddings/LayerNorm", eps)
    # (1 - mask) * -10000 as [batch, 1, 1, length], added to every head's scores
    unsqueezed = g.op("Unsqueeze", g.op("Unsqueeze", mask, g.const("axis_1", np.array([1], i64))),
                      g.const("axis_2", np.array([2], i64)))
    keep = g.op("Cast", unsqueezed, to=TensorProto.FLOAT)
    bias = g.op("Mul", g.op("Sub", g.const("one_f", np.float32(1.0)), keep), g.const("minus_10k", np.float32(-1e4)))
    split = g.const("split_heads", np.array([0, 0, heads, size], i64))
    merge = g.const("merge_heads", np.array([0, 0, H], i64))
    scale = g.const("sqrt_head_size", np.float32(math.sqrt(size)))
    for i in range(config.num_hidden_layers):
        p = f"bert/encoder/layer_{i}/"

        def project(part: str, perm: list[int], x=x, p=p) -> str:
            return g.op("Transpose", g.op("Reshape", g.dense(x, weights, f"{p}attention/self/{part}"), split),
                        perm=perm)

        q, k, v = project("query", [0, 2, 1, 3]), project("key", [0, 2, 3, 1]), project("value", [0, 2, 1, 3])
        scores = g.op("Add", g.op("Div", g.op("MatMul", q, k), scale), bias)
        context = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
        context = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), merge)
        attended = g.dense(context, weights, f"{p}attention/output/dense")
        x = g.layer_norm(g.op("Add", attended, x), weights, f"{p}attention/output/LayerNorm", eps)
        inner = g.gelu(g.dense(x, weights, f"{p}intermediate/dense"), config.hidden_act)
        x = g.layer_norm(g.op("Add", g.dense(inner, weights, f"{p}output/dense"), x), weights,
                         f"{p}output/LayerNorm", eps)
    # masked-LM head at the asked positions: [batch, positions, hidden] -> [batch, positions, vocab]
    at = g.op("GatherND", x, g.op("Unsqueeze", positions, g.const("axes_last", np.array([-1], i64))), batch_dims=1)
    h = g.layer_norm(g.gelu(g.dense(at, weights, "cls/predictions/transform/dense"), config.hidden_act), weights,
                     "cls/predictions/transform/LayerNorm", eps)
    decoder = g.const("cls/predictions/decoder", weights["bert/embeddings/word_embeddings"].T)
    g.nodes.append(helper.make_node("Add", [g.op("MatMul", h, decoder), g.const(
        "cls/predictions/output_bias", weights["cls/predictions/output_bias"])], ["mlm_logits"], name="mlm_logits"))
    # next-sentence head on [CLS]
    first = g.op("Squeeze", g.op("Gather", x, g.const("zero_1d", np.array([0], i64)), axis=1),
                 g.const("axis_1", np.array([1], i64)))
    pooled = g.op("Tanh", g.dense(first, weights, "bert/pooler/dense"))
    g.nodes.append(helper.make_node("Add", [g.op("MatMul", pooled, g.const(
        "cls/seq_relationship/kernel", weights["cls/seq_relationship/output_weights"].T)), g.const(
        "cls/seq_relationship/output_bias", weights["cls/seq_relationship/output_bias"])], ["nsp_logits"],
        name="nsp_logits"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "positions" if n == positions
                                                                   else "length"]) for n in INPUTS]
    outputs = [helper.make_tensor_value_info("mlm_logits", TensorProto.FLOAT, ["batch", "positions",
                                                                              config.vocab_size]),
               helper.make_tensor_value_info("nsp_logits", TensorProto.FLOAT, ["batch", 2])]
    graph = helper.make_graph(g.nodes, "bertdistill_student", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bertdistill")
    model.ir_version = 8  # readable by every ONNX Runtime since 1.10
    return model


def save(model, path: Path) -> None:
    """Write through a temporary name: a reader never sees half a model."""
    import onnx

    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)


def quantize(fp32: Path, int8: Path) -> None:
    """fp32 -> int8 by ONNX Runtime's dynamic quantiser: every MatMul with a constant weight becomes an
    integer one, its weights int8 per output channel, its activations quantised as each call runs.

    Measured on the demo student (held-out masked-LM top-1, 19,960 positions): per-tensor scales
    cost 0.47 points, per-channel 0.06. ONNX Runtime's transformer optimiser first (fused
    Attention, then QAttention) did not run faster on 2 cores, so the graph is quantised as built.
    """
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=int8.parent) as tmp:
        staged = Path(tmp) / int8.name
        quantize_dynamic(fp32, staged, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
        os.replace(staged, int8)


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with every graph optimisation, on `threads` cores (all by default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    # SkipLayerNormalization, the fusion of a residual Add with the LayerNorm after it, measured slower
    # on these CPUs: int8 student, batch 32 x 64 tokens, 2 cores: 56.8 ms a batch with it, 46.6 without.
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["SkipLayerNormFusion"])


def feeds(input_ids: np.ndarray, input_mask: np.ndarray, segment_ids: np.ndarray,
          positions: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": input_ids.astype(np.int64), "attention_mask": input_mask.astype(np.int64),
            "token_type_ids": segment_ids.astype(np.int64), "masked_positions": positions.astype(np.int64)}
