"""Shared fixtures. Everything here runs offline on bundled data, on the CPU.

The Hub must never be reached from the tests, so offline mode is forced before anything imports
``huggingface_hub`` or ``datasets``.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from fedmitr.clients import ClientResult, train_clients  # noqa: E402
from fedmitr.config import RunConfig, preset_config  # noqa: E402
from fedmitr.data import ImageDataset, open_dataset, partition, subsample  # noqa: E402
from fedmitr.runtime import make_accelerator  # noqa: E402

# The models under test are tiny (~20k parameters). With 2 intra-op threads on a 2-core machine,
# any other busy process makes torch's threads spin against each other and a training step goes
# from ~5 ms to ~400 ms; one thread keeps the suite fast and its timing predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist5k() -> ImageDataset:
    """The bundled MNIST sample, loaded once. Tests must not mutate its tensors."""
    return open_dataset("mnist5k")


@pytest.fixture(scope="session")
def tiny_cfg() -> RunConfig:
    return preset_config("tiny").validate()


@pytest.fixture(scope="session")
def tiny_data(mnist5k: ImageDataset, tiny_cfg: RunConfig) -> ImageDataset:
    """mnist5k cut down to the tiny preset's sizes (600 train / 200 test, stratified)."""
    return subsample(mnist5k, tiny_cfg.data.max_train_samples, tiny_cfg.data.max_test_samples)


@pytest.fixture(scope="session")
def tiny_clients(tiny_data: ImageDataset, tiny_cfg: RunConfig) -> list[ClientResult]:
    """Three tiny clients trained for a few seconds on skewed MNIST (weak, but input-sensitive).

    Shared by the server-stage tests, which must not train them further.
    """
    cfg = dataclasses.replace(tiny_cfg.clients, epochs=8)
    part = partition(tiny_data.train.labels.numpy(), 3, 0.5, 10, seed=0)
    return train_clients(tiny_data, part, tiny_cfg.model, cfg, accelerator=make_accelerator(), seed=0)


@pytest.fixture(scope="session")
def teachers(tiny_clients):
    return [c.model for c in tiny_clients]


@pytest.fixture(scope="session")
def ensemble(tiny_clients):
    """The three tiny clients as the server's teacher."""
    from fedmitr.ensemble import Ensemble

    return Ensemble([c.model for c in tiny_clients], [c.num_samples for c in tiny_clients])


@pytest.fixture(scope="session")
def teacher_sizes(tiny_clients):
    return [c.num_samples for c in tiny_clients]


@pytest.fixture(scope="session")
def bounds(tiny_data):
    return tiny_data.pixel_bounds()


@pytest.fixture()
def model_factory(tiny_cfg: RunConfig, tiny_data: ImageDataset):
    """Fresh tiny-preset models, seeded: ``model_factory(seed=1)``."""
    from fedmitr.models import build_model

    def make(seed: int = 0):
        torch.manual_seed(seed)
        return build_model(tiny_cfg.model, tiny_data.num_classes, tiny_data.channels, tiny_data.image_size)

    return make
