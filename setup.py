from setuptools import find_packages, setup

setup(
    name="mixsd_edit",
    version="0.1.0",
    description="MixSD (Mixed Contextual Self-Distillation) as a knowledge-editing method with EasyEdit's interface",
    packages=find_packages(include=["mixsd_edit", "mixsd_edit.*"]),
    package_data={"mixsd_edit": ["data/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",  # install the CPU wheel first: pip install torch==2.13.0
        "transformers>=4.57",
        "accelerate",  # transformers needs it to read GGUF files
        "gguf",
        "datasets",
        "pyyaml",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        # the suite covers the benchmark code too (TF-IDF consistency, plots)
        "test": ["pytest", "scikit-learn", "matplotlib"],
        "bench": ["scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["mixsd-edit=mixsd_edit.cli:main"]},
)
