"""EngineConfig is the engine's part of ServerConfig: same names, types and defaults, copied by engine_config()."""

from __future__ import annotations

import dataclasses
import typing

from embedsvc.engine.config import EngineConfig
from embedsvc.service.config import ServerConfig, load_config


def test_every_engine_setting_is_a_server_setting_with_the_same_type_and_default():
    server = {f.name: f for f in dataclasses.fields(ServerConfig)}
    server_hints, engine_hints = typing.get_type_hints(ServerConfig), typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        assert f.name in server, f"EngineConfig.{f.name} is no ServerConfig field: the config file could not set it"
        assert (engine_hints[f.name], f.default) == (server_hints[f.name], server[f.name].default), f.name


def test_engine_config_carries_the_servers_values():
    config = load_config(
        env={
            "EMBEDSVC_MAX_BATCH_SIZE": "7",
            "EMBEDSVC_DEFAULT_MODEL": "m",
            "EMBEDSVC_STORE_THUMBNAILS": "true",
            "EMBEDSVC_DECODE_NICE": "3",
        }
    )
    engine = config.engine_config()
    assert (engine.max_batch_size, engine.default_model, engine.store_thumbnails, engine.decode_nice) == (
        7,
        "m",
        True,
        3,
    )
    assert all(getattr(engine, f.name) == getattr(config, f.name) for f in dataclasses.fields(EngineConfig))
