from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# vpt_plugin.pth runs `import vpt_plugin_startup` when Python starts, which activates the
# plugin on the first `import llamafactory` (see src/vpt_plugin_startup.py). A .pth file must
# sit at the top of site-packages, which no setup() option puts it: the build copies it there.
STARTUP_PTH = "vpt_plugin.pth"


class BuildWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path("src") / STARTUP_PTH), str(Path(self.build_lib) / STARTUP_PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / STARTUP_PTH)]


class EditableWithStartupHook(editable_wheel):
    # `pip install -e` builds its wheel from a staging directory that setuptools fills in
    # _install_namespaces (a private hook, present since setuptools 64); the .pth goes there too.
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        self.copy_file(str(Path("src") / STARTUP_PTH), str(Path(installation_dir) / STARTUP_PTH))


setup(
    name="vpt-plugin",
    version="0.1.0",
    description="Visual Perception Tokens for multimodal LLMs, as a LLaMA-Factory plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # patches/ (upstream code we change, one module per upstream module) ships as vpt_plugin.patches.
    package_dir={"": "src", "vpt_plugin.patches": "patches"},
    packages=find_packages("src") + ["vpt_plugin.patches"],
    py_modules=["vpt_plugin_startup"],
    cmdclass={"build_py": BuildWithStartupHook, "editable_wheel": EditableWithStartupHook},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "transformers>=5.6,<=5.6.0",
        "llamafactory==0.9.5",
        "peft>=0.18,<0.19",
        "safetensors",
        "tokenizers",
        "pillow",
        "pyyaml",
        # LLaMA-Factory's predict_with_generate metrics import these.
        "jieba",
        "nltk",
        "rouge-chinese",
        # The LLM judge (vpt_plugin.evaluation.judge) talks to any OpenAI-compatible endpoint.
        "openai>=1.40",
    ],
    extras_require={
        # segment-anything reads the official SAM checkpoints (sam_vit_*.pth).
        "sam": ["segment-anything==1.0"],
        # DeepSpeed builds from source: `pip install hjson msgpack ninja py-cpuinfo` first, then
        # `DS_BUILD_OPS=0 pip install --no-build-isolation "vpt-plugin[deepspeed]"` (make install does).
        "deepspeed": ["deepspeed==0.19.8"],
        "test": ["pytest", "segment-anything==1.0"],
    },
    entry_points={"console_scripts": ["vpt = vpt_plugin.cli:main"]},
)
