from setuptools import find_packages, setup

setup(
    name="vpt-plugin",
    version="0.1.0",
    description="Visual Perception Tokens for multimodal LLMs, as a LLaMA-Factory plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "transformers>=5.6,<=5.6.0",
        "llamafactory==0.9.5",
        "peft>=0.18,<0.19",
        "safetensors",
        "tokenizers",
        "pillow",
    ],
    extras_require={
        # segment-anything reads the official SAM checkpoints (sam_vit_*.pth).
        "sam": ["segment-anything==1.0"],
        "test": ["pytest", "segment-anything==1.0"],
    },
    entry_points={"console_scripts": ["vpt = vpt_plugin.cli:main"]},
)
