"""Writes an FP8 checkpoint in Hugging Face's DeepSeek-V3 layout from an
mlx-lm model folder (a golden's model/): every linear weight but the
router's as e4m3 bytes (safetensors dtype F8_E4M3) with a float32
`weight_scale_inv` per 128x128 tile (max |w| / 448, as DeepSeek's
converter does), experts one per tensor, kv_b_proj unsplit, and
`quantization_config` {quant_method: fp8, weight_block_size: [128, 128]}.
mlx-lm's sanitize dequantizes such a folder to bfloat16; `make_golden.py
--model-dir` then records mlx-lm's outputs for it.

    .venv/bin/python porting-tools/python/make_fp8_checkpoint.py \\
        goldens/deepseek_v3/model goldens/checkpoints/deepseek_v3_fp8
"""
import json
import shutil
import struct
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent / "cases"))
from rules_hf import deepseek_v3_to_hf  # noqa: E402

BLOCK = 128


def to_fp8(w):
    """e4m3 bytes and the scale per BLOCK x BLOCK tile of a 2-D weight."""
    m, n = w.shape
    pm, pn = (-m) % BLOCK, (-n) % BLOCK
    p = mx.pad(w.astype(mx.float32), ((0, pm), (0, pn)))
    tiles = p.reshape((m + pm) // BLOCK, BLOCK, (n + pn) // BLOCK, BLOCK)
    scale = mx.abs(tiles).max(axis=(1, 3)) / 448.0
    scale = mx.where(scale == 0, 1.0, scale)
    q = mx.to_fp8(tiles / scale[:, None, :, None]).reshape(m + pm, n + pn)[:m, :n]
    return mx.contiguous(q), scale.astype(mx.float32)


def quantizable(name, value):
    return (name.endswith("_proj.weight") and value.ndim == 2
            and ".mlp.gate." not in name)


def main(src, dst):
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    weights = deepseek_v3_to_hf(dict(mx.load(str(src / "model.safetensors"))), config)
    saved, fp8 = {}, []
    for k, v in sorted(weights.items()):
        if quantizable(k, v):
            q, s = to_fp8(v)
            saved[k] = q
            saved[k + "_scale_inv"] = s
            fp8.append(k)
        else:
            saved[k] = v
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = dst / "model.safetensors"
    mx.save_safetensors(str(path), saved, metadata={"format": "pt"})
    # mx.save writes the bytes as U8: name them F8_E4M3 as Hugging Face does.
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for k in fp8:
        header[k]["dtype"] = "F8_E4M3"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    print(f"{dst}: {len(fp8)} FP8 weights")


if __name__ == "__main__":
    main(*sys.argv[1:3])
