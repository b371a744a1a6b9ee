"""Build megatron_slung and its extension megatron_slung._C.

C++ sources (csrc/*.cpp) are always built. CUDA sources (csrc/*.cu) are added only when torch is a
CUDA build and a CUDA toolkit is found; set SLUNG_NO_CUDA=1 to skip them anyway. Build against the
torch you already have:  pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - a build without torch cannot make the extension
    raise SystemExit(
        "megatron-slung builds its C++ extension against an installed torch. Install torch first "
        "(e.g. `pip install torch==2.13.0`), then `pip install --no-build-isolation -e .`"
    ) from e

HERE = os.path.dirname(os.path.abspath(__file__))


def _with_cuda() -> bool:
    if os.environ.get("SLUNG_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cxx_std() -> str:
    # torch >= 2.14's headers need C++20; older ones build with C++17
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", _cxx_std(), "-fopenmp"]
    if not _with_cuda():
        return CppExtension(
            "megatron_slung._C",
            cpp,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # No GPU to ask: build for A100 and H100 (plus PTX for newer cards) instead of every arch.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    return CUDAExtension(
        "megatron_slung._C",
        cpp + cu,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("SLUNG_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", _cxx_std(), "--use_fast_math", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    name="megatron-slung",
    version="0.1.0",
    description="Risk-aware large-scale GPT pretraining: selective loss on tagged data, Megatron-style parallelism on DeepSpeed",
    packages=find_packages(include=["megatron_slung", "megatron_slung.*"]),
    package_data={"megatron_slung.safety": ["templates/*.md", "templates/*.txt", "templates/*/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "numpy",
        "sentencepiece",
        "transformers",
        "pybind11",
        "tqdm",
        "tensorboard",
        "safetensors",
        "zstandard",
        "pyyaml",
    ],
    extras_require={
        # wandb: --wandb-project (optional at run time; the tests read an offline run's files)
        # fasttext-numpy2: tools/train_risk_classifier.py --backend fasttext (optional at run time)
        # tiktoken: --tokenizer-type TikTokenizer (optional at run time; the tests build a tiny BPE file)
        "test": ["pytest", "pytest-timeout", "wandb", "fasttext-numpy2", "tiktoken"],
        "tiktoken": ["tiktoken"],  # --tokenizer-type TikTokenizer
        "eval": ["scikit-learn", "matplotlib", "alt-profanity-check", "lm-eval[hf]"],
        "pipeline": ["datatrove>=0.10.1,<0.11"],  # tools/pipeline.py: tagging + preprocessing in resumable tasks
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
