"""GPT decoder blocks (RoPE, RMSNorm, SwiGLU, GQA) and pipeline stage specs."""
