"""Exports a Llama-architecture GGUF to an ONNX decoder with a KV cache.

The graph is built directly with ``onnx.helper`` from the GGUF's numpy
weights (the ``gguf`` package reads and dequantizes them), so no torch is
needed anywhere. The tokenizer, the chat template and the model's shape
travel inside the .onnx as metadata, so one file is one artifact with one
sha256, exactly like a GGUF.

The graph contract (checked by the ONNX backend at load):

- inputs: ``input_ids`` int64 ``[batch, seq]``; ``logits_to_keep`` int64
  ``[1]`` (how many trailing positions get logits: 1 when generating, all when
  scoring); ``past_key_values.{i}.key|value`` float32
  ``[batch, n_kv_heads, past, head_dim]`` for every layer (``past`` may be 0);
- outputs: ``logits`` float32 ``[batch, keep, vocab]`` and
  ``present.{i}.key|value`` ``[batch, n_kv_heads, past + seq, head_dim]``.

Rotary embeddings follow llama.cpp's convention (rotate adjacent pairs)
because the GGUF converter permuted Q and K for it; the agreement test
against llama.cpp proves the two match.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXPORTER_VERSION = 1
OPSET = 17
IR_VERSION = 9
META_CONFIG = "quantfleet.config"
META_TOKENIZER = "quantfleet.tokenizer"
META_CHAT_TEMPLATE = "quantfleet.chat_template"


class ExportError(ValueError):
    """The source GGUF cannot be exported; the message names the file and why."""


@dataclass(frozen=True)
class DecoderConfig:
    """The shape of the decoder, stored in the .onnx as ``quantfleet.config``."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    n_ctx_train: int
    rope_base: float
    rms_eps: float
    exporter_version: int = EXPORTER_VERSION
    source_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _field(reader: Any, key: str, path: Path) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ExportError(f"{path}: metadata {key!r} is missing")
    return field.contents()


def _config(reader: Any, path: Path, source_sha256: str) -> DecoderConfig:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ExportError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    n_embd = int(_field(reader, "llama.embedding_length", path))
    n_head = int(_field(reader, "llama.attention.head_count", path))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv", path))
    head_dim = n_embd // n_head
    rope_dims = reader.fields.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims.contents()) != head_dim:
        raise ExportError(f"{path}: partial rotary ({rope_dims.contents()} of {head_dim} dims) "
                          "is not supported")
    base = reader.fields.get("llama.rope.freq_base")
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    return DecoderConfig(
        n_layer=int(_field(reader, "llama.block_count", path)),
        n_embd=n_embd,
        n_ff=int(_field(reader, "llama.feed_forward_length", path)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        vocab_size=len(tokens),
        n_ctx_train=int(_field(reader, "llama.context_length", path)),
        rope_base=float(base.contents()) if base is not None else 10000.0,
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        source_sha256=source_sha256,
    )


def tokenizer_data(reader: Any, path: Path) -> dict[str, Any]:
    """The GGUF's tokenizer as JSON-able data (what ``models.tokenizer`` reads)."""
    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise ExportError(f"{path}: tokenizer model {model!r} is not supported (only 'gpt2' BPE)")

    def opt(key: str, default: Any) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    return {
        "model": model,
        "pre": opt("tokenizer.ggml.pre", "default"),
        "tokens": list(_field(reader, "tokenizer.ggml.tokens", path)),
        "token_types": [int(t) for t in _field(reader, "tokenizer.ggml.token_type", path)],
        "merges": list(_field(reader, "tokenizer.ggml.merges", path)),
        "bos_token_id": int(opt("tokenizer.ggml.bos_token_id", -1)),
        "eos_token_id": int(opt("tokenizer.ggml.eos_token_id", -1)),
        "add_bos_token": bool(opt("tokenizer.ggml.add_bos_token", False)),
    }


class _Weights:
    """Float32 weights by GGUF tensor name, dequantized on demand."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.path = path
        self.by_name = {t.name: t for t in reader.tensors}

    def get(self, name: str) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.by_name.get(name)
        if t is None:
            raise ExportError(f"{self.path}: tensor {name!r} is missing")
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(t.data)
        else:
            data = dequantize(t.data, t.tensor_type)
        # numpy shape is ggml's reversed: (rows = out features, cols = in features)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return np.asarray(data, dtype=np.float32).reshape(shape)

    def raw(self, name: str) -> np.ndarray:
        t = self.by_name.get(name)
        if t is None:
            raise ExportError(f"{self.path}: tensor {name!r} is missing")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return np.asarray(t.data).reshape(shape)


class _Graph:
    """A little builder that names nodes and keeps initializers in one place."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def ops(self, op_type: str, inputs: list[str], hint: str | None = None,
            outputs: list[str] | None = None, n_out: int = 1, **attrs: Any) -> list[str]:
        """Add one node; return the names of its outputs."""
        from onnx import helper

        hint = hint or op_type.lower()
        outs = outputs or [self.name(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(hint), **attrs))
        return outs

    def op(self, op_type: str, inputs: list[str], hint: str | None = None,
           outputs: list[str] | None = None, **attrs: Any) -> str:
        """Add a single-output node; return its output's name."""
        return self.ops(op_type, inputs, hint, outputs, **attrs)[0]


def _rope_tables(cfg: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    half = cfg.head_dim // 2
    inv = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.head_dim)
    ang = np.arange(cfg.n_ctx_train, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def build_model(gguf_path: Path | str, *, source_sha256: str = "") -> Any:
    """Build the fp32 ONNX decoder (an ``onnx.ModelProto``) from a Llama GGUF."""
    import onnx
    from gguf import GGUFReader
    from onnx import TensorProto, helper

    path = Path(gguf_path)
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: gguf could not read it ({exc})") from None
    cfg = _config(reader, path, source_sha256)
    tok = tokenizer_data(reader, path)
    template = reader.fields.get("tokenizer.chat_template")
    w = _Weights(reader, path)
    g = _Graph()

    i64 = np.int64
    c = {  # small shared constants
        "zero": g.const("c_zero", np.array(0, i64)),
        "one": g.const("c_one", np.array(1, i64)),
        "two": g.const("c_two", np.array(2, i64)),
        "eps": g.const("c_eps", np.array(cfg.rms_eps, np.float32)),
        "scale": g.const("c_scale", np.array(1.0 / np.sqrt(cfg.head_dim), np.float32)),
        "neg": g.const("c_neg", np.array(-1e9, np.float32)),
        "fzero": g.const("c_fzero", np.array(0.0, np.float32)),
        "split2": g.const("c_split2", np.array([1, 1], i64)),
        "int_max": g.const("c_int_max", np.array([2**62], i64)),
        "ax1": g.const("c_ax1", np.array([1], i64)),
        "ax_last": g.const("c_ax_last", np.array([-1], i64)),
    }
    nh, nkv, hd, half = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim // 2
    shape_q = g.const("shape_q", np.array([0, 0, nh, half, 2], i64))
    shape_k = g.const("shape_k", np.array([0, 0, nkv, half, 2], i64))
    shape_q4 = g.const("shape_q4", np.array([0, 0, nh, hd], i64))
    shape_k4 = g.const("shape_k4", np.array([0, 0, nkv, hd], i64))
    shape_merge = g.const("shape_merge", np.array([0, 0, cfg.n_embd], i64))
    shape_rope = g.const("shape_rope", np.array([1, -1, 1, half, 1], i64))
    shape_heads = g.const("shape_heads", np.array([0, nh, -1, hd], i64))
    expand_gqa = g.const("expand_gqa", np.array([1, 1, nh // nkv, 1, 1], i64))
    unsq2 = g.const("c_unsq2", np.array([2], i64))
    cos_t, sin_t = _rope_tables(cfg)
    g.const("rope_cos", cos_t)
    g.const("rope_sin", sin_t)

    # positions: past_len .. past_len + seq
    past0 = "past_key_values.0.key"
    past_len = g.op("Gather", [g.op("Shape", [past0]), c["two"]], "past_len", axis=0)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), c["one"]], "seq_len", axis=0)
    total = g.op("Add", [past_len, seq_len], "total_len")
    pos = g.op("Range", [past_len, total, c["one"]], "positions")
    cos = g.op("Reshape", [g.op("Gather", ["rope_cos", pos], axis=0), shape_rope], "cos")
    sin = g.op("Reshape", [g.op("Gather", ["rope_sin", pos], axis=0), shape_rope], "sin")
    # causal mask over [seq, total]: key j is visible to query i when j <= past + i
    kpos = g.op("Range", [c["zero"], total, c["one"]], "key_positions")
    qcol = g.op("Unsqueeze", [pos, c["ax_last"]], "query_positions")
    visible = g.op("LessOrEqual", [kpos, qcol], "visible")
    mask = g.op("Where", [visible, c["fzero"], c["neg"]], "causal_mask")

    # token embeddings: the F16 table stays F16 (lossless), rows are cast after lookup
    embd_f16 = w.raw("token_embd.weight").astype(np.float16)
    g.const("token_embd", embd_f16)
    h = g.op("Cast", [g.op("Gather", ["token_embd", "input_ids"], axis=0)], "embd",
             to=TensorProto.FLOAT)

    def rms_norm(x: str, weight: str) -> str:
        w_name = g.const(f"{weight}", w.get(weight))
        ms = g.op("ReduceMean", [g.op("Mul", [x, x])], "ms", axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, c["eps"]])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), w_name], "rms_norm")

    def linear(x: str, weight: str) -> str:
        # GGUF rows are output features; MatMul wants [in, out]
        w_name = g.const(weight, np.ascontiguousarray(w.get(weight).T))
        return g.op("MatMul", [x, w_name], weight.replace(".", "_"))

    def rope(x: str, shape5: str, shape4: str) -> str:
        # llama.cpp's NORM rotary: pairs (x[2i], x[2i+1]) rotate by pos * base^(-2i/d)
        x5 = g.op("Reshape", [x, shape5])
        x0, x1 = g.ops("Split", [x5, c["split2"]], "rope_split", n_out=2, axis=-1)
        r0 = g.op("Sub", [g.op("Mul", [x0, cos]), g.op("Mul", [x1, sin])])
        r1 = g.op("Add", [g.op("Mul", [x0, sin]), g.op("Mul", [x1, cos])])
        return g.op("Reshape", [g.op("Concat", [r0, r1], axis=-1), shape4], "roped")

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "keep", cfg.vocab_size])]
    for i in range(cfg.n_layer):
        p = f"blk.{i}"
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", nkv, "past", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", nkv, "total", hd]))
        x = rms_norm(h, f"{p}.attn_norm.weight")
        q = rope(linear(x, f"{p}.attn_q.weight"), shape_q, shape_q4)      # [B,S,nh,hd]
        k = rope(linear(x, f"{p}.attn_k.weight"), shape_k, shape_k4)      # [B,S,nkv,hd]
        v = g.op("Reshape", [linear(x, f"{p}.attn_v.weight"), shape_k4])
        q = g.op("Transpose", [g.op("Mul", [q, c["scale"]])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], perm=[0, 2, 1, 3])
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"],
                     axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v],
                     outputs=[f"present.{i}.value"], axis=2)

        def heads(t: str) -> str:
            # grouped-query attention: query head j reads kv head j // (nh / nkv)
            t5 = g.op("Expand", [g.op("Unsqueeze", [t, unsq2]), expand_gqa])
            return g.op("Reshape", [t5, shape_heads], "gqa")

        scores = g.op("MatMul", [q, g.op("Transpose", [heads(k_all)], perm=[0, 1, 3, 2])],
                      "scores")
        probs = g.op("Softmax", [g.op("Add", [scores, mask])], "probs", axis=-1)
        attn = g.op("Transpose", [g.op("MatMul", [probs, heads(v_all)])], perm=[0, 2, 1, 3])
        attn = g.op("Reshape", [attn, shape_merge], "attn")
        h = g.op("Add", [h, linear(attn, f"{p}.attn_output.weight")], "resid_attn")
        x = rms_norm(h, f"{p}.ffn_norm.weight")
        gate = linear(x, f"{p}.ffn_gate.weight")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu")
        up = linear(x, f"{p}.ffn_up.weight")
        h = g.op("Add", [h, linear(g.op("Mul", [act, up]), f"{p}.ffn_down.weight")], "resid_ffn")

    x = rms_norm(h, "output_norm.weight")
    starts = g.op("Neg", ["logits_to_keep"], "keep_from")
    x = g.op("Slice", [x, starts, c["int_max"], c["ax1"]], "last_positions")
    head = "output.weight" if "output.weight" in w.by_name else "token_embd.weight"
    lm = g.const("lm_head", np.ascontiguousarray(w.get(head).T))
    g.op("MatMul", [x, lm], outputs=["logits"])

    graph = helper.make_graph(g.nodes, "quantfleet_decoder", inputs, outputs, g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="quantfleet.onnx_export",
        producer_version=str(EXPORTER_VERSION),
    )
    model.ir_version = IR_VERSION
    set_metadata(model, {
        META_CONFIG: cfg.to_json(),
        META_TOKENIZER: json.dumps(tok, ensure_ascii=False),
        META_CHAT_TEMPLATE: template.contents() if template is not None else "",
    })
    onnx.checker.check_model(model, full_check=False)
    return model


def set_metadata(model: Any, values: dict[str, str]) -> None:
    """Replace ``metadata_props`` entries (quantizers do not always carry them over)."""
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def metadata_of(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def export(gguf_path: Path | str, out_path: Path | str, *, source_sha256: str = "") -> Path:
    """Export ``gguf_path`` to an fp32 .onnx at ``out_path`` (one file, no external data)."""
    import onnx

    model = build_model(gguf_path, source_sha256=source_sha256)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out


@dataclass(frozen=True)
class Int8Settings:
    """How the int8 rung is quantized: everything that changes which kernel runs.

    ``dynamic`` is ``quantize_dynamic``: weights quantized ahead (``weight_type``),
    activations quantized per call to uint8 by DynamicQuantizeLinear, so the
    MatMuls are U8S8 (QInt8 weights) or U8U8 (QUInt8 weights). ``qdq_static`` is
    ``quantize_static`` in QDQ format with int8 activations whose scales come
    from a calibration run over a few prompts (S8S8).
    """

    weight_type: str = "QUInt8"  # "QInt8" or "QUInt8"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: u8 x s7 pair sums fit in 16 bits
    quant_format: str = "dynamic"  # "dynamic" or "qdq_static"
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.weight_type not in INT8_WEIGHT_TYPES:
            raise ExportError(f"int8 weight_type {self.weight_type!r} is not one of "
                              f"{list(INT8_WEIGHT_TYPES)}")
        if self.quant_format not in INT8_FORMATS:
            raise ExportError(f"int8 quant_format {self.quant_format!r} is not one of "
                              f"{list(INT8_FORMATS)}")

    @property
    def activation_type(self) -> str:
        return "QUInt8" if self.quant_format == "dynamic" else "QInt8"

    @property
    def kernel(self) -> str:
        """The integer GEMM ONNX Runtime runs: activation type, then weight type."""
        a = "U8" if self.activation_type == "QUInt8" else "S8"
        w = "U8" if self.weight_type == "QUInt8" else "S8"
        return a + w

    def requires_cpu(self) -> list[dict[str, Any]]:
        """The CPU features a device needs for these settings to compute correctly.

        Without VNNI, MLAS's x86 U8S8 kernels (AVX2 and AVX-512BW) multiply with
        vpmaddubsw, which adds each pair of u8 x s8 products into a *saturating*
        16-bit lane: 2 x 255 x 127 overflows it. Measured on this model under
        qemu -cpu Haswell: mean KLD 3.9 against fp32 (0.08 natively; docs/onnx.md).
        VNNI (vpdpbusd) and AMX accumulate in 32 bits. ``reduce_range`` (7-bit
        weights: 2 x 255 x 64 fits) and U8U8 (widened to 16 bits, then vpmaddwd)
        are exact on every x86 kernel; the S8S8 QDQ model measured the same on
        the AVX2 path as natively; ARM's NEON and dot-product kernels widen.
        Per-tensor U8S8 happened to stay clear of saturation on this model
        (its weights are small against the tensor-wide scale) but can saturate,
        so it needs VNNI too.
        """
        if self.kernel == "U8S8" and not self.reduce_range:
            return [{"arch": "x86_64", "any_of": list(VNNI_FEATURES),
                     "why": f"int8 {self.kernel} MatMuls without reduce_range overflow "
                            "vpmaddubsw's saturating 16-bit sums on x86 CPUs without VNNI"}]
        return []

    def record(self) -> dict[str, Any]:
        """The settings as stored in the .onnx (``quantfleet.quantization``) and the catalog."""
        return {
            "method": "int8_dynamic" if self.quant_format == "dynamic" else "int8_qdq_static",
            "quant_format": self.quant_format,
            "weight_type": self.weight_type,
            "activation_type": self.activation_type,
            "kernel": self.kernel,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "keep_float": list(self.keep_float),
        }


INT8_WEIGHT_TYPES = ("QInt8", "QUInt8")
INT8_FORMATS = ("dynamic", "qdq_static")
#: x86 features whose int8 dot products accumulate in 32 bits (no 16-bit saturation)
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
#: Recipe of the int8 files quantfleet built before it recorded the settings:
#: what an int8 file without ``quantfleet.quantization`` is taken to be.
LEGACY_INT8 = Int8Settings(weight_type="QInt8", per_channel=True, reduce_range=False,
                           keep_float=("ffn_down",))
META_QUANTIZATION = "quantfleet.quantization"

# Calibration prompts for the static (QDQ) recipe: short, varied, and not the
# text the agreement test measures on.
CALIBRATION_TEXTS = (
    "<|im_start|>user\nWhat is the tallest mountain in Europe?<|im_end|>\n<|im_start|>assistant\n"
    "Mount Elbrus in the Caucasus, at 5,642 metres, is usually counted as the tallest.",
    "Rain fell on the old stone bridge all night, and by morning the river had risen to the "
    "arches. The baker opened late; the postman did not come at all.",
    '{"name": "Ada Lovelace", "born": 1815, "known_for": ["the Analytical Engine", "notes"]}',
    "for i in range(10):\n    if i % 3 == 0:\n        print(i, 'fizz')\n",
    "Prices rose 3.2 percent in March, after 2.9 percent in February; economists had "
    "expected 3.0. The central bank meets again on 14 May.",
)


def quantize_int8(src: Path | str, dst: Path | str, settings: Int8Settings, *,
                  variant: str = "") -> Path:
    """int8 weight MatMuls (``settings`` say how); the settings are stored in the file.

    ``settings.keep_float`` lists parts of weight names left in float32:
    SmolLM's ``ffn_down`` input has activation outliers that per-tensor
    activation quantization cannot represent (measured: mean KLD 0.31
    quantized, 0.07 kept).
    """
    import onnx
    from onnxruntime.quantization import QuantType

    model = onnx.load_model(str(src), load_external_data=False)
    meta = metadata_of(model)
    exclude = [n.name for n in model.graph.node
               if n.op_type == "MatMul" and len(n.input) > 1
               and any(k in n.input[1] for k in settings.keep_float)]
    del model
    weight_type = getattr(QuantType, settings.weight_type)
    # attention's activation x activation MatMuls stay in float
    extra = {"MatMulConstBOnly": True}
    if settings.quant_format == "dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"],
                         per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                         weight_type=weight_type, nodes_to_exclude=exclude,
                         extra_options=extra)
    else:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        quantize_static(str(src), str(dst), _Calibration(Path(src), meta),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                        activation_type=QuantType.QInt8, weight_type=weight_type,
                        nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax,
                        extra_options=extra)
    record = {**settings.record(), "requires_cpu": settings.requires_cpu(), "variant": variant}
    meta[META_QUANTIZATION] = json.dumps(record, sort_keys=True)
    _restore_metadata(Path(dst), meta)
    return Path(dst)


class _Calibration:
    """Feeds CALIBRATION_TEXTS, tokenized as the device would, to ``quantize_static``."""

    def __init__(self, model_path: Path, meta: dict[str, str]) -> None:
        from quantfleet.models.tokenizer import BPETokenizer

        cfg = json.loads(meta[META_CONFIG])
        tok = BPETokenizer(json.loads(meta[META_TOKENIZER]))
        empty = np.zeros((1, cfg["n_head_kv"], 0, cfg["head_dim"]), dtype=np.float32)
        self._feeds = []
        for text in CALIBRATION_TEXTS:
            ids = tok.encode(text)
            feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                    "logits_to_keep": np.asarray([1], dtype=np.int64)}
            for i in range(cfg["n_layer"]):
                feed[f"past_key_values.{i}.key"] = empty
                feed[f"past_key_values.{i}.value"] = empty
            self._feeds.append(feed)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __iter__(self) -> _Calibration:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_int4(src: Path | str, dst: Path | str, *, block_size: int = 32,
                  symmetric: bool = True, accuracy_level: int | None = None) -> Path:
    """Weight-only int4 (MatMulNBits, one scale per ``block_size`` weights)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load_model(str(src))
    meta = metadata_of(model)
    quant = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level)
    quant.process()
    out = quant.model.model
    set_metadata(out, meta)
    onnx.save_model(out, str(dst))
    return Path(dst)


def _restore_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load_model(str(path))
    if metadata_of(model) != meta:
        set_metadata(model, meta)
        onnx.save_model(model, str(path))


def describe_onnx(path: Path | str) -> tuple[dict[str, int], int]:
    """(initializer data types and weight op types with counts, parameter count) of a .onnx."""
    from collections import Counter

    import onnx
    from onnx import TensorProto

    model = onnx.load_model(str(path))
    counts: Counter[str] = Counter()
    n_params = 0
    for init in model.graph.initializer:
        counts[TensorProto.DataType.Name(init.data_type)] += 1
        n = 1
        for d in init.dims:
            n *= d
        n_params += n
    weight_ops = {"MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
                  "MatMulIntegerToFloat", "Gather", "GatherBlockQuantized"}
    for node in model.graph.node:
        if node.op_type in weight_ops:
            counts[f"op:{node.op_type}"] += 1
    return dict(sorted(counts.items())), n_params
