"""The Ray Data engine of `embedsvc index`: decode + embed on an actor pool, writes on the driver.

The same job grows from one machine to a Ray cluster without code changes: each actor loads the model
once (one GPU per actor where there are GPUs), `map_batches` streams batches of (id, bytes or path)
through it, and the driver writes the returned vectors into the durable store batch by batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from embedsvc import errors
from embedsvc.jobs.sources import DEFAULT_MAX_IMAGE_BYTES, read_image_file

if TYPE_CHECKING:
    from PIL import Image

    from embedsvc.models import ModelSpec


class EmbedActor:
    """Decodes and embeds a batch for every target collection's pooling with one forward pass."""

    def __init__(
        self, spec: ModelSpec, targets: list[dict], device: str = "auto", max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    ):
        """`spec`, not a registry name: a worker's registry holds only the bundled models, not those the job's
        process registered from --models-file or --checkpoint."""
        from embedsvc.encoder import ClipEncoder
        from embedsvc.models import load_model
        from embedsvc.pooling import NetVLADState, PoolingSpec, bind_pooling, image_token_modes
        from embedsvc.store import CollectionConfig

        loaded = load_model(spec, device=device)
        for target in targets:  # the bytes this actor loaded, maybe on another node and after the driver's check
            CollectionConfig.from_json(target["config"]).check_weights(loaded.weights_sha256)
        self.encoder = ClipEncoder(loaded)
        self.poolings = [
            bind_pooling(
                PoolingSpec(t["pooling"], t["params"]), NetVLADState.from_bytes(t["state"]) if t["state"] else None
            )
            for t in targets
        ]
        self.dims = [t["dim"] for t in targets]
        self.modes = image_token_modes(self.poolings)
        self.max_image_bytes = max_image_bytes

    def __call__(self, batch: dict) -> dict:
        from embedsvc.encoder.images import DEFAULT_MAX_PIXELS, decode_image
        from embedsvc.errors import EmbedsvcError

        images: list[Image.Image | None] = []
        reasons: list[str] = []
        for path, data in zip(batch["path"], batch["data"]):
            try:
                raw = read_image_file(path, self.max_image_bytes) if path else bytes(data)
                images.append(decode_image(raw, DEFAULT_MAX_PIXELS, self.encoder.loaded.image_size))
                reasons.append("")
            except FileNotFoundError:
                images.append(None)
                reasons.append("file not found")
            except (EmbedsvcError, OSError) as exc:
                images.append(None)
                reasons.append(str(exc))
        good = [i for i, image in enumerate(images) if image is not None]
        out = {"id": batch["id"], "reason": np.array(reasons, dtype=object)}
        features = self.encoder.encode_images([images[i] for i in good], self.modes) if good else None
        for k, (pooling, dim) in enumerate(zip(self.poolings, self.dims)):
            vectors = np.zeros((len(reasons), dim), dtype=np.float32)
            if features is not None:
                vectors[good] = pooling(features).cpu().numpy()
            out[f"vector_{k}"] = vectors
        return out


def embed_with_ray(
    rows: list[dict],
    spec: ModelSpec,
    targets: list[dict],
    batch_size: int,
    actors: int,
    device: str = "auto",
    address: str | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Iterator[dict]:
    """Yields batches {id, reason, vector_0..} in any order; starts a local Ray instance unless one is running.
    Actors read the files of rows with a path, `max_image_bytes` at most (regular files only). An error a worker
    raised is raised here as the same embedsvc error (one line), not as Ray's wrapper with its traceback."""
    import ray
    import ray.data
    import torch

    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        started_here = True
    try:
        gpus = 1 if torch.cuda.is_available() else 0
        dataset = ray.data.from_items(rows)
        embedded = dataset.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "spec": spec,
                "targets": targets,
                "device": device,
                "max_image_bytes": max_image_bytes,
            },
            concurrency=actors,
            batch_size=batch_size,
            num_gpus=gpus,
            batch_format="numpy",
        )
        try:
            yield from embedded.iter_batches(batch_size=batch_size, batch_format="numpy")
        except ray.exceptions.RayError as exc:
            raise worker_error(str(exc)) from None
    finally:
        if started_here:
            ray.shutdown()


# The last line of a worker's traceback as Ray carries it: Ray Data keeps only the text of an actor's error.
_WORKER_ERROR = re.compile(r"^embedsvc\.errors\.(\w+): (.+)$", re.MULTILINE)


def worker_error(text: str) -> errors.EmbedsvcError:
    """Ray's text of a failed worker as the embedsvc error it raised (same type and message), or Unavailable
    with the text's last line for anything else (a worker killed, out of memory)."""
    found = _WORKER_ERROR.findall(text)
    if found:
        name, message = found[-1]
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, errors.EmbedsvcError):
            return kind(f"a Ray worker: {message}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return errors.Unavailable(f"the Ray job failed: {lines[-1] if lines else 'no reason given'}")
