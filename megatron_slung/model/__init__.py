"""GPT decoder blocks (Megatron's switches: positions, norms, GeLU/SwiGLU, biases, GQA) and pipeline stage specs.

``gpt`` (the model, its config, FLOPs, TP state-dict helpers) and ``hf_llama`` (Hugging Face adapters)
import without DeepSpeed; ``pipeline`` (the DeepSpeed PipelineModule) imports DeepSpeed.
"""

from megatron_slung.model.gpt import GPTConfig, GPTModel, flops_per_token, pad_vocab_size  # noqa: F401
