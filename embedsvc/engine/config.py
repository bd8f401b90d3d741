"""The settings the engine reads, and nothing else: a server makes them from its ServerConfig
(`ServerConfig.engine_config()`), a bulk job directly. This module imports nothing heavy.

Each field is the ServerConfig field of the same name, with the same default and meaning (documented there
and in the configuration table; tests/test_layering.py checks that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from embedsvc.cpu import DEFAULT_DECODE_NICE


@dataclass(frozen=True)
class EngineConfig:
    # Models: which one a request without a name gets, extra specs, where and how they run.
    default_model: str = "embedsvc-tiny-scenes-2"
    models_file: str = ""
    device: str = "auto"
    precision: str = "auto"
    # Batching of forward passes (engine.batching.DynamicBatcher).
    max_batch_size: int = 64
    max_batch_delay_ms: float = 5.0
    max_queue: int = 2048
    # Limits on what one operation takes.
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_image_header_pixels: int = 150_000_000
    max_request_pixels: int = 500_000_000
    max_text_chars: int = 4096
    max_items_per_request: int = 1024
    max_fit_samples: int = 10_000
    max_fit_bytes: int = 1024 * 1024 * 1024
    # Threads: torch's intra-op team (0: the usable CPUs), image decoders and their nice increment.
    torch_threads: int = 0
    decode_workers: int = 2
    decode_nice: int = DEFAULT_DECODE_NICE
    # Keep a JPEG thumbnail of every image item upserted.
    store_thumbnails: bool = False
