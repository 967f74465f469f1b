"""One-off: write dreambooth_min/tokenizer/{vocab.json, merges.txt} from open_clip's BPE merges.

CLIP's tokenizer (OpenAI, MIT licence) is defined by one file, `bpe_simple_vocab_16e6.txt.gz`, which ships
inside the open_clip_torch wheel. Its vocabulary is derived, not stored: the 256 byte symbols, the same
with the end-of-word marker `</w>`, one token per merge (first 48894 merges), then the two special tokens:
49408 in all. transformers' CLIPTokenizer reads the same thing as vocab.json + merges.txt.

    python3 tools/make_tokenizer.py [path/to/bpe_simple_vocab_16e6.txt.gz]
"""
import gzip
import importlib.util
import json
import sys
from pathlib import Path

N_MERGES = 49408 - 2 * 256 - 2  # vocab size minus byte symbols minus special tokens = 48894


def bytes_to_unicode():
    """Byte -> printable character map used by byte-level BPE (GPT-2, CLIP).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    chr(256 + n) in byte order, so that no BPE symbol is whitespace. Dict order is the vocab order.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def main():
    if len(sys.argv) > 1:
        src = Path(sys.argv[1])
    else:  # find_spec locates the package without importing it (open_clip's __init__ needs torchvision)
        src = Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = lines[1:1 + N_MERGES]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    out = Path(__file__).resolve().parent.parent / "dreambooth_min" / "tokenizer"
    out.mkdir(exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


if __name__ == "__main__":
    main()
