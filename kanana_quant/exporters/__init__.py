"""Writers that turn quantized weights into files other runtimes read (GGUF for llama.cpp, ...)."""
