"""SentencePiece token ids for the gemma3-270m GGUF vocabulary, a second
check of lmspec's GGUF SentencePiece tokenizer (the first is llama.cpp
itself: goldens/gemma3_270m_gguf/llama_cpp.json).

Builds a SentencePiece model proto from the GGUF's `tokenizer.ggml.*`
metadata the way llama.cpp's SPM tokenizer reads it, runs the `sentencepiece`
package on it, and writes goldens/gemma3_270m_gguf/spm_tokenize.json: for
each string, the ids (no BOS/EOS) and the decoded text.

The proto: model type BPE (merge the adjacent pair whose concatenation is a
piece with the highest score), byte_fallback on, pieces with the GGUF scores
and token types (the GGUF codes are sentencepiece's: 1 normal, 2 unknown,
3 control, 4 user-defined, 5 unused, 6 byte), normalizer "identity" with
add_dummy_prefix = `tokenizer.ggml.add_space_prefix`, no removal of extra
whitespace, spaces escaped as U+2581. llama.cpp matches user-defined tokens
in the raw text (spaces not yet escaped), so user-defined pieces are written
with their spaces as U+2581 here to match the same text. Control tokens are
not matched in text (llama.cpp with parse_special=false).

Known differences from llama.cpp, none hit by these strings: sentencepiece
matches user-defined pieces left to right, longest at each position, where
llama.cpp splits the raw text on each user-defined token, longest token
first; text that already holds U+2581 next to a space or another U+2581
matches the space-run pieces here but not in llama.cpp (whose pieces hold
real spaces); llama.cpp makes tokens it takes as ending generation by their
text (`</s>`, `<end_of_turn>`, ...) control tokens, so gemma3's
user-defined `</s>` is not matched in plain text there.

Run: .venv/bin/python porting-tools/python/make_spm_tokenizer_fixture.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_reference_strings import PROMPTS, TOKENIZE_STRINGS  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ".venv/models/gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = "goldens/gemma3_270m_gguf/spm_tokenize.json"

# llama.cpp's strings and prompts, then a few more.
STRINGS = TOKENIZE_STRINGS + PROMPTS + [
    "a<b>bold</b> and <table><tr><td>x</td></tr></table>",
    "\x00\x01\x7f control bytes",
    "mixed\t \n \t\n  indentation",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v.item() if hasattr(v, "item") else v


def build_proto(path: Path) -> tuple[pb.ModelProto, dict]:
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = [int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()]
    add_space_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    meta = {
        "tokenizer.ggml.model": field(reader, "tokenizer.ggml.model"),
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
        "tokenizer.ggml.bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.unknown_token_id": field(reader, "tokenizer.ggml.unknown_token_id"),
        "tokenizer.ggml.padding_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "vocab_size": len(tokens),
    }
    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.split_by_whitespace = False
    t.unk_id = meta["tokenizer.ggml.unknown_token_id"]
    t.bos_id = meta["tokenizer.ggml.bos_token_id"]
    t.eos_id = meta["tokenizer.ggml.eos_token_id"]
    t.pad_id = meta["tokenizer.ggml.padding_token_id"]
    t.unk_piece = tokens[t.unk_id]
    t.bos_piece = tokens[t.bos_id]
    t.eos_piece = tokens[t.eos_id]
    t.pad_piece = tokens[t.pad_id]
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = add_space_prefix
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    for text, score, typ in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece = text.replace(" ", "\u2581") if typ == 4 else text
        p.score = float(score)
        p.type = typ
    return m, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    model = Path(args.model)
    if not model.is_absolute():
        model = REPO_ROOT / model
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO_ROOT / out

    proto, meta = build_proto(model)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    cases = []
    for s in STRINGS:
        ids = sp.EncodeAsIds(s)
        cases.append({"text": s, "ids": ids, "decoded": sp.DecodeIds(ids)})
    doc = {
        "meta": {
            "generator": ".venv/bin/python porting-tools/python/make_spm_tokenizer_fixture.py",
            "sentencepiece_version": spm.__version__,
            "model_file": model.name,
            "proto": "BPE, byte_fallback, identity normalizer, add_dummy_prefix = add_space_prefix, "
            "remove_extra_whitespaces false, user-defined pieces with spaces as U+2581",
            "gguf": meta,
        },
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(cases)} strings")


if __name__ == "__main__":
    main()
