"""The model file: GGUF headers (gguf_meta), per-architecture split rules (archs), partial GGUFs
holding a layer range (split), and the tokenizer/detokenizer over llama.cpp's vocabulary (vocab)."""
