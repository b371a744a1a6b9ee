"""A local text generator for the safety tools: ``generate(prompts, seed) -> list[str]`` (the new text only).

- ``hf``: a Hugging Face causal-LM directory (``AutoModelForCausalLM``, ``local_files_only``), batched with
  left padding, on CUDA when available;
- ``vllm``: the same directory served by vLLM (when it is installed and a GPU is present; ``auto`` picks it).

Sampling is seeded per call: the same prompts and seed give the same texts (the tools seed each batch by
its position in the input, so a resumed run writes what an uninterrupted one would have).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

ENGINES = ("auto", "hf", "vllm")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7   # 0: greedy
    top_p: float = 0.9
    batch_size: int = 16


def vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def build_generator(path: str, engine: str = "auto", config: GenerationConfig | None = None, device: str | None = None):
    config = config or GenerationConfig()
    if not path or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--generator {path!r} is not a local Hugging Face model directory "
                                "(config.json missing; nothing is downloaded)")
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine == "vllm" and not vllm_usable():
        raise ImportError("--engine vllm needs vLLM (pip install vllm) and a CUDA GPU")
    if engine == "vllm" or (engine == "auto" and vllm_usable()):
        return VLLMGenerator(path, config)
    return HFGenerator(path, config, device)


class HFGenerator:
    engine = "hf"

    def __init__(self, path: str, config: GenerationConfig, device: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.config, self.path = torch, config, path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"  # decoder-only: prompts end where generation starts
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(self.device).eval()
        cfg = self.model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def fits(self, prompt: str) -> bool:
        return self.prompt_tokens(prompt) + self.config.max_new_tokens <= self.context

    def generate(self, prompts: list[str], seed: int) -> list[str]:
        torch, cfg = self.torch, self.config
        out: list[str] = []
        for b in range(0, len(prompts), cfg.batch_size):
            torch.manual_seed(seed + b)
            enc = self.tokenizer(prompts[b:b + cfg.batch_size], return_tensors="pt", padding=True).to(self.device)
            sample = cfg.temperature > 0
            kw = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if sample else {"do_sample": False}
            with torch.inference_mode():
                ids = self.model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                          eos_token_id=self.tokenizer.eos_token_id, **kw)
            new = ids[:, enc["input_ids"].shape[1]:]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out


class VLLMGenerator:
    engine = "vllm"

    def __init__(self, path: str, config: GenerationConfig):
        from vllm import LLM

        self.config, self.path = config, path
        self.llm = LLM(model=path, seed=0)
        self.tokenizer = self.llm.get_tokenizer()
        self.context = self.llm.llm_engine.model_config.max_model_len

    def fits(self, prompt: str) -> bool:
        return len(self.tokenizer(prompt)["input_ids"]) + self.config.max_new_tokens <= self.context

    def generate(self, prompts: list[str], seed: int) -> list[str]:
        from vllm import SamplingParams

        cfg = self.config
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p if cfg.temperature > 0 else 1.0, seed=seed + i)
                  for i in range(len(prompts))]  # a seed per prompt: the text does not depend on the batch
        return [o.outputs[0].text for o in self.llm.generate(prompts, params, use_tqdm=False)]
