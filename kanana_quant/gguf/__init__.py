"""llama.cpp's GGUF format, one concern per module, in gguf-py's spirit: tensor names and the Q/K row order
(names), the header scanner (header), GGML block codecs and exact carriers (blocks), llama-quantize's file
types and per-tensor mix (mix), tokenizers in metadata (vocab), and the reader and writer built on them."""
