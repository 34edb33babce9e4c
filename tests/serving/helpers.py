"""Helpers of the serving tests: images of the tiny memory's data, and a client of a served memory."""

from __future__ import annotations

import os

from fastapi.testclient import TestClient

from serving.app import create_app
from serving.settings import ServeSettings

TOKEN = "t" * 8 + "0123456789abcdef"


def training_image(fmnist_small: str, cls: str, index: int = 0) -> tuple[str, str]:
    """(path, entry id) of a training image: one that is in the memory."""
    folder = os.path.join(fmnist_small, "train", cls)
    name = sorted(os.listdir(folder))[index]
    return os.path.join(folder, name), f"{cls}/{name}"


def held_out_images(fmnist_small: str) -> list[str]:
    """Every held-out image (not in the memory), sorted."""
    root = os.path.join(fmnist_small, "test")
    return [os.path.join(root, c, n) for c in sorted(os.listdir(root)) for n in sorted(os.listdir(os.path.join(root, c)))]


def make_client(memory: str, **settings) -> TestClient:
    """A test client of the app serving ``memory`` (enter it with ``with``: that opens the memory)."""
    return TestClient(create_app(ServeSettings(memory=memory, refresh_interval_s=0.05, **settings)))


def flipping_query(client, fmnist_small: str, *, k: int = 3) -> tuple[str, bytes, dict]:
    """A held-out image whose decision (rank, ``k``) changes when its top neighbour is excluded, found through
    the API (``client``: a test client or an ``httpx.Client`` of a running server): its path, bytes and classify
    answer.
    """
    for path in held_out_images(fmnist_small):
        with open(path, "rb") as f:
            data = f.read()
        p = client.post("/v1/classify", params={"k": k, "return_embedding": "true"},
                        files={"image": ("q.png", data, "image/png")}).json()
        r = client.post(f"/v1/revote?k={k}", json={"embedding": p["embedding"],
                                                    "changes": [{"id": p["neighbors"][0]["id"], "weight": 0}]}).json()
        if r["after"]["label_name"] != r["before"]["label_name"]:
            return path, data, p
    raise AssertionError("no held-out image changes its decision when its top neighbour is excluded")
