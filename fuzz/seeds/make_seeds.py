#!/usr/bin/env python3
"""Write the hand-made seed inputs of the fuzz corpora into fuzz/corpus/<target>/.

Real inputs come from tests/fixtures and from files `mlcb build` writes (see README, Hardening);
this script adds small, valid files of each binary format that exercise many features at once,
so the fuzzer starts from inputs that parse. Only the Python standard library is used.
"""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] -> a .safetensors file."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    import json
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def gguf(kvs, tensors, alignment=32):
    """kvs: [(key, type_id, packed value bytes)]; tensors: [(name, dims, ggml_type, raw)]."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, t, v in kvs:
        out += s(k) + struct.pack("<I", t) + v
    off = 0
    datas = b""
    for name, dims, ty, raw in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, off)
        pad = (-len(raw)) % alignment
        datas += raw + b"\0" * pad
        off += len(raw) + pad
    out += b"\0" * ((-len(out)) % alignment)
    return out + datas


def gguf_str(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def torch_checkpoint(tensors):
    """tensors: [(name, storage class, shape, stride, offset, numel, raw)] -> torch.save zip."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils

    def _rebuild_tensor_v2(*a):
        raise RuntimeError("never called")
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    classes = {}
    for cls in ("HalfStorage", "FloatStorage", "BFloat16Storage", "LongStorage"):
        c = type(cls, (), {"__module__": "torch"})
        setattr(torch, cls, c)
        classes[cls] = c

    class Storage:
        def __init__(self, key, cls, numel):
            self.key, self.cls, self.numel = key, cls, numel

    class Tensor:
        def __init__(self, storage, offset, shape, stride):
            self.a = (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())

        def __reduce__(self):
            return (_rebuild_tensor_v2, self.a)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", classes[obj.cls], obj.key, "cpu", obj.numel)
            return None

    sd = collections.OrderedDict()
    raws = {}
    for i, (name, cls, shape, stride, offset, numel, raw) in enumerate(tensors):
        st = Storage(str(i), cls, numel)
        sd[name] = Tensor(st, offset, shape, stride)
        raws[str(i)] = raw
    buf = io.BytesIO()
    P(buf, protocol=2).dump(sd)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", b"little")
        for k, raw in raws.items():
            z.writestr("archive/data/" + k, raw)
        z.writestr("archive/version", b"3\n")
    for m in ("torch", "torch._utils"):
        del sys.modules[m]
    return out.getvalue(), buf.getvalue()


def main():
    f16 = lambda n: bytes(range(2 * n)) if 2 * n < 256 else b"\x01\x3c" * n
    put("safetensors_header", "hand-three-dtypes.safetensors", safetensors(
        [("a.weight", "F16", [2, 3], f16(6)), ("b.bias", "F32", [3], b"\0\0\x80\x3f" * 3),
         ("c.skip", "F64", [1], b"\0" * 8), ("d.ids", "I64", [2], b"\1" + b"\0" * 15)],
        {"format": "pt"}))
    put("safetensors_header", "hand-empty.safetensors", safetensors([]))
    put("safetensors_header", "hand-scalar.safetensors", safetensors([("s", "BF16", [], b"\x80\x3f")]))

    kvs = [
        ("general.architecture", 8, gguf_str("llama")),
        ("general.alignment", 4, struct.pack("<I", 32)),
        ("llama.context_length", 4, struct.pack("<I", 128)),
        ("llama.embedding_length", 4, struct.pack("<I", 8)),
        ("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        ("llama.use_parallel", 7, b"\1"),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + gguf_str("a") + gguf_str("b") + gguf_str("<s>")),
        ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0, -1, -2)),
        ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, 1, 3)),
        ("general.size", 10, struct.pack("<Q", 12345)),
        ("general.signed", 11, struct.pack("<q", -5)),
        ("general.double", 12, struct.pack("<d", 0.5)),
    ]
    tensors = [
        ("token_embd.weight", [8, 3], 1, f16(24)),   # F16
        ("output_norm.weight", [8], 0, b"\0\0\x80\x3f" * 8),  # F32
        ("blk.0.attn_q.weight", [32, 1], 8, b"\0" * 34),  # Q8_0: one block of 32
    ]
    put("gguf", "hand-llama-v3.gguf", gguf(kvs, tensors))
    put("gguf", "hand-empty.gguf", gguf([], []))

    ckpt, pkl = torch_checkpoint([
        ("w.weight", "HalfStorage", [2, 3], [3, 1], 0, 6, f16(6)),
        ("w.t", "HalfStorage", [3, 2], [1, 3], 0, 6, f16(6)),
        ("b.bias", "FloatStorage", [3], [1], 0, 3, b"\0\0\x80\x3f" * 3),
        ("ids", "LongStorage", [2], [1], 0, 2, b"\1" + b"\0" * 15),
        ("bf", "BFloat16Storage", [2], [2], 1, 4, b"\x80\x3f" * 4),
    ])
    put("pickle", "hand-checkpoint.bin", ckpt)
    put("pickle", "hand-data.pkl", pkl)


if __name__ == "__main__":
    main()
