"""Packaging only: one package `editrt` whose sub-packages live in the top-level folders."""
from setuptools import setup

setup(
    name="editrt",
    version="0.1.0",
    description="Low-latency inference runtime for diffusion-based spatial image editing",
    python_requires=">=3.10",
    packages=[
        "editrt",
        "editrt.models",
        "editrt.kernels",
        "editrt.export",
        "editrt.runtime",
        "editrt.bench",
    ],
    package_dir={
        "editrt": "editrt",
        "editrt.models": "models",
        "editrt.kernels": "kernels",
        "editrt.export": "export",
        "editrt.runtime": "runtime",
        "editrt.bench": "bench",
    },
    package_data={"editrt": ["configs/*.json", "assets/*"]},
    install_requires=[
        # A range, so the package installs beside an existing CUDA torch (tested: 2.11 on the GPU machine,
        # 2.14.1 on the development/CI machines, whose pip is capped at the wheels on their disk).
        "torch>=2.4",
        "torchvision>=0.19",
        "diffusers>=0.32",
        "transformers>=4.45",
        "segment-anything>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "scipy>=1.10",
        "triton>=3.0",
        "onnx>=1.16",
        "onnxscript>=0.1",
        "onnxruntime>=1.18",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # editrt bench --plot
    ],
    extras_require={
        "tensorrt": ["tensorrt>=10.0"],
        "gpu": ["onnxruntime-gpu>=1.18"],
        "watermark": ["invisible-watermark>=0.2"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "peft>=0.13",  # oracle for LoRA fusion (diffusers' load_lora_weights needs it)
            "scikit-image>=0.22",  # real photographs for tests
            "invisible-watermark>=0.2",
        ],
    },
    entry_points={"console_scripts": ["editrt=editrt.cli:main"]},
)
